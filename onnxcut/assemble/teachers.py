"""The teacher of an assembled model: the parts' whole models, joined channel for channel.

Distilling an assembled model against its parts needs one target per output channel. Given
the models the parts were cut from (one per part, in the order they were assembled),
`teacher_for` assembles them exactly (no union, no cut below the head) into the student's
channel order, with the student's temperatures and background rule, so a single-teacher
distill can train the student against all of them at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from onnx import ModelProto

from onnxcut.assemble.driver import ASSEMBLY_KEY, AssembleOptions, assemble
from onnxcut.assemble.parts import Part
from onnxcut.attribution.probe import CATEGORIES_KEY
from onnxcut.errors import ModelError
from onnxcut.graph.io import load

ModelLike = str | os.PathLike[str] | ModelProto


def teacher_for(
    student: ModelLike,
    teachers: Sequence[ModelLike],
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ModelProto:
    """Assemble `teachers` (one per part of `student`) into the student's channel order."""
    s = student if isinstance(student, ModelProto) else load(student)
    meta = {p.key: p.value for p in s.metadata_props}
    if ASSEMBLY_KEY not in meta or CATEGORIES_KEY not in meta:
        raise ModelError(
            f"the student has no {ASSEMBLY_KEY} metadata; one teacher per part needs a model "
            "made by onnxcut assemble (give a single --teacher otherwise)"
        )
    info = json.loads(meta[ASSEMBLY_KEY])
    origins = json.loads(meta[CATEGORIES_KEY])[info["output"]]
    n = len(info["parts"])
    if len(teachers) != n:
        raise ModelError(
            f"the student assembles {n} parts; pass {n} teachers, one per part, in the order "
            f"they were assembled (got {len(teachers)})"
        )
    background = info.get("background")
    first = 1 if background else 0
    chosen: list[list[int]] = [[] for _ in range(n)]
    for part, label in origins[first:]:
        if not isinstance(label, int):
            raise ModelError(
                f"student channel [{part}, {label}] comes from an assembly inside an assembly; "
                "distill such a student against that inner assembly's teachers one level at a time"
            )
        chosen[part].append(label)
    # Parts with no channel of their own (a union partner computes them) join only for a
    # background maximum.
    kept = [k for k in range(n) if chosen[k] or background == "max" or (background and k == 0)]
    temperatures = [info["units"][info["parts"][k]["unit"]]["temperature"] for k in kept]
    options = AssembleOptions(
        background=background or "first",
        background_category=origins[0][1] if background else 0,
        input_shapes=input_shapes,
        temperatures=tuple(temperatures),
        share="exact",
    )
    parts = [Part(teachers[k], tuple(chosen[k])) for k in kept]
    model = assemble(parts, options)
    props = {p.key: p for p in model.metadata_props}
    output, got = next(iter(json.loads(props[CATEGORIES_KEY].value).items()))
    if [c[1] for c in got] != [c[1] for c in origins]:
        raise ModelError(
            "the teachers do not give the student's categories in its order; pass the models "
            "the parts were cut from, in the order they were assembled"
        )
    # Channel for channel the student's: the same [part, category] list (parts left out
    # above would renumber it otherwise), which tells distill to map channels one to one.
    props[CATEGORIES_KEY].value = json.dumps({output: origins})
    return model
