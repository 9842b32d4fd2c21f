"""Parts of an assembly: what each model brings, checked against the others.

A part is a model (or a sub-network `extract` made), or a model with a plan (the sub-network
`extract(model, plan)`), with an optional list of categories to keep. Categories are the
part's own labels: the original indices its `onnxcut.categories` metadata records, or its
output channels where it has none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onnx import ModelProto

from onnxcut import data
from onnxcut.attribution.probe import CATEGORIES_KEY, Head, find_head
from onnxcut.channels.plan import OutputKeep, Plan, PlanLike, as_plan
from onnxcut.channels.surgery import extract
from onnxcut.errors import DataError, ModelError, OnnxcutError
from onnxcut.graph.io import FLOAT_TYPES, GraphIndex, load, sha256
from onnxcut.graph.shapes import dims, graph_inputs

log = logging.getLogger(__name__)

Label = int | list  # an original category index, or an earlier assembly's [part, index]


@dataclass(frozen=True)
class Part:
    """One model of an assembly: a path or ModelProto, the categories to keep (None: all),
    and optionally the plan that makes the sub-network from `model`."""

    model: str | os.PathLike[str] | ModelProto
    categories: tuple[int, ...] | None = None
    plan: PlanLike | None = None


def parse_part(spec: str) -> Part:
    """Parse `MODEL[@PLAN.json][:CATS]`, e.g. `a.onnx:3,5` or `a.onnx@p.json`."""
    path, cats = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[0-9,\s]*", tail):
        path = head
        items = [c.strip() for c in tail.split(",")]
        if not tail.strip() or any(not c for c in items):
            raise DataError(
                f"part '{spec}': empty category in the list; write MODEL:3,5 or leave ':' out"
            )
        cats = tuple(int(c) for c in items)
    elif sep and head and re.fullmatch(r"[\w,\s-]+", tail) and "," in tail:
        raise DataError(f"part '{spec}': categories are indices, e.g. {head}:3,5")
    plan = None
    model, at, plan_path = path.rpartition("@")
    if at and model and plan_path.lower().endswith(".json"):
        path, plan = model, plan_path
    return Part(path, cats, plan)


@dataclass
class Loaded:
    """A part after loading and checking: its sub-network, head and chosen channels."""

    index: int
    source: str
    model: ModelProto  # the part's network (with its plan applied)
    head: Head
    labels: list[Label]  # label of each head channel
    chosen: list[int]  # head channels to join, in the order asked (background excluded)
    background: int | None  # head channel of the background (segmentation)
    original: ModelProto | None = None  # the model a plan part is cut from
    plan: Plan | None = None
    group: str | None = None  # identity of `original`, for same-model unions
    input_names: list[str] = field(default_factory=list)  # as the model names them


def load_parts(
    parts: Sequence[Part],
    *,
    input_name: str | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    background_category: int,
) -> list[Loaded]:
    """Load every part, then check that they take the same input and read images alike."""
    if len(parts) < 1:
        raise DataError("give at least one part to assemble: MODEL[:CATS] ...")
    loaded = [
        _load_part(i, p, input_name, input_shapes, background_category) for i, p in enumerate(parts)
    ]
    _check_inputs(loaded, input_name)
    _check_preprocess(loaded)
    _check_heads(loaded)
    return loaded


def _source(part: Part, i: int) -> str:
    return f"<in-memory part {i}>" if isinstance(part.model, ModelProto) else str(part.model)


def _load_part(
    i: int,
    part: Part,
    input_name: str | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    background_category: int,
) -> Loaded:
    source = _source(part, i)
    model = load(part.model)
    names = [v.name for v in graph_inputs(model)]
    if input_name is not None and len(names) != 1:
        raise ModelError(
            f"part {i} ({source}) has {len(names)} inputs ({', '.join(names)}); --input maps "
            "single-input models only"
        )
    if input_shapes:
        shapes = {
            (names[0] if input_name is not None and k == input_name else k): v
            for k, v in input_shapes.items()
        }
        try:
            model = load(model, shapes)
        except ModelError as e:
            raise ModelError(f"part {i} ({source}): {e}") from None
    original, plan, group = None, None, None
    if part.plan is not None:
        plan = as_plan(part.plan)
        original = model
        group = _identity(part.model)
        model = extract(original, plan)
    head = _head(model, i, source)
    labels = head_labels(model, head)
    chosen, background = _choose(part, labels, head, i, source, background_category)
    return Loaded(i, source, model, head, labels, chosen, background, original, plan, group, names)


def _identity(given) -> str:
    """What makes plan parts parts of one model: the same bytes."""
    if isinstance(given, ModelProto):
        try:
            return hashlib.sha256(given.SerializeToString()).hexdigest()
        except Exception:  # over 2 GB: protobuf cannot serialise it; the object is the model
            return f"proto:{id(given)}"
    return sha256(given)


def _head(model: ModelProto, i: int, source: str) -> Head:
    try:
        return find_head(model)
    except ModelError as e:
        index = GraphIndex(model)
        ranked = [
            o
            for o in index.outputs
            if index.dtype(o) in FLOAT_TYPES and len(index.shape(o) or []) in (2, 4)
        ]
        what = (
            "no category output (a float output of rank 2 or 4, categories on axis 1)"
            if not ranked
            else f"{len(ranked)} candidate category outputs ({', '.join(ranked)}), not one"
        )
        raise ModelError(
            f"part {i} ({source}) has {what}; assemble classifiers or segmenters "
            f"with one category output ({' '.join(str(e).split())[:80]})"
        ) from None


def head_labels(model: ModelProto, head: Head) -> list[Label]:
    meta = {p.key: p.value for p in model.metadata_props}
    if CATEGORIES_KEY in meta:
        try:
            cats = json.loads(meta[CATEGORIES_KEY]).get(head.output)
        except (json.JSONDecodeError, AttributeError):
            cats = None
        if isinstance(cats, list) and len(cats) == head.n_categories:
            return cats
    return list(range(head.n_categories))


def label_keys(labels: Sequence[Label]) -> list[int]:
    """What a part's category list names: original indices, or channel positions where the
    part is itself an assembly (its labels are pairs)."""
    if all(isinstance(c, int) for c in labels):
        return [int(c) for c in labels]
    return list(range(len(labels)))


def _choose(
    part: Part, labels: list[Label], head: Head, i: int, source: str, background_category: int
) -> tuple[list[int], int | None]:
    keys = label_keys(labels)
    background = None
    if head.spatial:
        if background_category not in keys:
            raise ModelError(
                f"part {i} ({source}) segments but has no background channel (category "
                f"{background_category}; it has {_shown(keys)}); keep the background when "
                "cutting it, or pass --background-category"
            )
        background = keys.index(background_category)
    if part.categories is None:
        return [c for c in range(len(keys)) if c != background], background
    seen: set[int] = set()
    for c in part.categories:
        if c in seen:
            raise DataError(
                f"part {i} ({source}) lists category {c} twice; list each category once"
            )
        seen.add(c)
        if c not in keys:
            raise DataError(
                f"part {i} ({source}): category {c} is not among its outputs ({_shown(keys)}); "
                "choose from those"
            )
    chosen = [keys.index(c) for c in part.categories if keys.index(c) != background]
    return chosen, background


def _shown(keys: Sequence[int]) -> str:
    text = ",".join(map(str, keys[:16]))
    return text + (",..." if len(keys) > 16 else "")


def _shape_text(shape) -> str:
    return "x".join(map(str, shape)) if shape is not None else "unknown"


def _check_inputs(parts: list[Loaded], input_name: str | None) -> None:
    first = parts[0]
    reference = {v.name: v for v in graph_inputs(first.model)}
    ref_names = list(reference)
    for p in parts[1:]:
        mine = {v.name: v for v in graph_inputs(p.model)}
        if input_name is None and list(mine) != ref_names:
            raise ModelError(
                f"the inputs differ: part {p.index} ({p.source}) takes "
                f"{', '.join(mine) or 'none'}, part 0 ({first.source}) takes "
                f"{', '.join(ref_names)}; pass --input NAME to map single inputs onto one"
            )
        pairs = (
            zip(reference.values(), mine.values(), strict=True)
            if input_name is not None
            else ((reference[n], mine[n]) for n in ref_names)
        )
        for a, b in pairs:
            label = input_name or a.name
            ta, tb = a.type.tensor_type.elem_type, b.type.tensor_type.elem_type
            da, db = dims(a), dims(b)
            if ta != tb:
                raise ModelError(
                    f"input '{label}' differs: part {p.index} ({p.source}) has element type "
                    f"{tb}, part 0 ({first.source}) {ta}; assemble models that take one tensor"
                )
            if not _same_dims(da, db):
                raise ModelError(
                    f"input '{label}' differs: part {p.index} ({p.source}) is "
                    f"{_shape_text(db)}, part 0 ({first.source}) is {_shape_text(da)}; "
                    "assemble models that take the same image (--input-shape fixes dynamic dims)"
                )


def _same_dims(a, b) -> bool:
    if a is None or b is None or len(a) != len(b):
        return a is None and b is None
    for x, y in zip(a, b, strict=True):
        static_x = isinstance(x, int) and x > 0
        static_y = isinstance(y, int) and y > 0
        if static_x != static_y or (static_x and x != y):
            return False
    return True


def _check_preprocess(parts: list[Loaded]) -> None:
    first = parts[0]
    reference = data.preprocess_from(first.model).to_json()
    for p in parts[1:]:
        mine = data.preprocess_from(p.model).to_json()
        diff = [k for k in reference if reference[k] != mine[k]]
        if diff:
            k = diff[0]
            raise ModelError(
                f"the preprocessing differs: part {p.index} ({p.source}) records {k} "
                f"{mine[k]}, part 0 ({first.source}) {reference[k]} "
                f"({data.PREPROCESS_KEY}); parts must read images alike"
            )


def _check_heads(parts: list[Loaded]) -> None:
    first = parts[0]
    index0 = GraphIndex(first.model)
    for p in parts[1:]:
        if p.head.spatial != first.head.spatial:
            task = "segments" if p.head.spatial else "classifies"
            raise ModelError(
                f"part {p.index} ({p.source}) {task}, part 0 ({first.source}) does not; "
                "assemble parts of one task"
            )
        index = GraphIndex(p.model)
        if index.dtype(p.head.output) != index0.dtype(first.head.output):
            raise ModelError(
                f"part {p.index} ({p.source}): category output '{p.head.output}' has element "
                f"type {index.dtype(p.head.output)}, part 0's "
                f"{index0.dtype(first.head.output)}; convert them to one type"
            )
        if p.head.axis != first.head.axis:
            raise ModelError(
                f"part {p.index} ({p.source}) has its categories on axis {p.head.axis}, part 0 "
                f"on axis {first.head.axis}; assemble parts of one layout"
            )


def spatial_size(part: Loaded) -> tuple[int | str, ...] | None:
    """The spatial dims of a segmentation part's category output."""
    shape = GraphIndex(part.model).shape(part.head.output)
    if shape is None:
        return None
    return tuple(d for a, d in enumerate(shape) if a not in (0, part.head.axis))


def cut_or_keep(model: ModelProto, head: Head, positions: Sequence[int]) -> ModelProto | None:
    """Extract the head channels at `positions`, or None where the model cannot be cut
    (the join then gathers them)."""
    plan = Plan(outputs={head.output: OutputKeep(tuple(sorted(positions)), head.axis)})
    try:
        return extract(model, plan)
    except OnnxcutError as e:
        log.info("head '%s' not cut (%s); its channels are gathered instead", head.output, e)
        return None
