"""assemble(): one model that computes the union of what several parts were chosen for."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx
from onnx import ModelProto

from onnxcut import data
from onnxcut.assemble import calibration
from onnxcut.assemble.joining import Channel, Unit, harmonise_opsets, join
from onnxcut.assemble.parts import (
    Loaded,
    Part,
    cut_or_keep,
    head_labels,
    label_keys,
    load_parts,
    parse_part,
    spatial_size,
)
from onnxcut.assemble.sharing import share_identical_inplace, union_plan
from onnxcut.attribution.probe import CATEGORIES_KEY, find_head
from onnxcut.channels.surgery import extract
from onnxcut.errors import DataError, ModelError
from onnxcut.graph.shapes import declare_types_inplace, infer_shapes

log = logging.getLogger(__name__)

ASSEMBLY_KEY = "onnxcut.assembly"
BACKGROUNDS = ("first", "max")
SHARES = ("union", "exact")


@dataclass(frozen=True)
class AssembleOptions:
    input_name: str | None = None  # map every part's single input onto this name
    input_shapes: Mapping[str, Sequence[int]] | None = None
    background: str = "first"  # segmentation: the first part's background logit, or "max"
    background_category: int = 0
    resize_outputs: bool = False  # resize segmentation outputs to the largest size
    share: str = "union"  # plan parts of one model: "union" of their channels, or "exact"
    calibrate: str | None = None  # unlabeled images to fit per-part temperatures on
    calibrate_limit: int = 256
    temperatures: tuple[float, ...] | None = None  # fixed, one per part (instead of fitting)
    provider: str = "cpu"
    threads: int | None = None

    def check(self) -> None:
        if self.background not in BACKGROUNDS:
            raise DataError(f"--background '{self.background}': use first or max")
        if self.share not in SHARES:
            raise DataError(f"--share '{self.share}': use union or exact")
        if self.calibrate_limit < 1:
            raise DataError("--calibrate-limit must be at least 1")
        if self.temperatures is not None and self.calibrate is not None:
            raise DataError("give fixed temperatures or --calibrate, not both")
        if self.temperatures is not None and not all(t > 0 for t in self.temperatures):
            raise DataError(f"temperatures {list(self.temperatures)}: each must be above 0")


def assemble(
    parts: Sequence[Part | str | os.PathLike[str] | ModelProto],
    options: AssembleOptions | None = None,
) -> ModelProto:
    """Join the parts into one model; see docs/assemble.md.

    A part is a Part, a `MODEL[@PLAN.json][:CATS]` string or a model. Returns the assembled
    ModelProto with `onnxcut.categories` ([part, original category] per output channel) and
    `onnxcut.assembly` metadata.
    """
    opts = options or AssembleOptions()
    opts.check()
    given = [_as_part(p) for p in parts]
    loaded = load_parts(
        given,
        input_name=opts.input_name,
        input_shapes=opts.input_shapes,
        background_category=opts.background_category,
    )
    size = _output_size(loaded, opts.resize_outputs)
    units, owner, positions = _units(loaded, opts)
    harmonise_opsets(units)
    channels, backgrounds = _channels(loaded, units, owner, positions, opts)
    output = loaded[0].head.output
    names = {n: opts.input_name for p in loaded for n in p.input_names} if opts.input_name else None

    def build() -> ModelProto:
        return join(units, channels, backgrounds, input_names=names, output=output, resize_to=size)

    if opts.temperatures is not None:
        _fix_temperatures(units, opts.temperatures, len(loaded))
    model = build()
    if opts.calibrate is not None:
        _calibrate(model, units, positions, opts)
        model = build()
    shared = share_identical_inplace(model)
    _record(model, loaded, units, channels, backgrounds, output, shared, opts)
    declare_types_inplace(model)
    infer_shapes(model)
    _check(model)
    return model


def _as_part(p) -> Part:
    if isinstance(p, Part):
        return p
    if isinstance(p, ModelProto):
        return Part(p)
    return parse_part(str(p))


def _output_size(parts: list[Loaded], resize: bool) -> tuple[int, ...] | None:
    """The common spatial size of segmentation outputs (None: classification, or equal)."""
    if not parts[0].head.spatial:
        return None
    sizes = [spatial_size(p) for p in parts]
    if all(s == sizes[0] for s in sizes):
        return None
    static = [s for s in sizes if s is not None and all(isinstance(d, int) for d in s)]
    if not resize:
        k = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise ModelError(
            f"the outputs differ in size: part {k} ({parts[k].source}) gives "
            f"{_size(sizes[k])}, part 0 ({parts[0].source}) {_size(sizes[0])}; pass "
            "--resize-outputs to resize them to the largest"
        )
    if len(static) < len(sizes):
        raise ModelError("--resize-outputs needs static output sizes; pass --input-shape")
    return tuple(max(s[a] for s in static) for a in range(len(static[0])))


def _size(s) -> str:
    return "x".join(map(str, s)) if s else "unknown"


def _units(loaded: list[Loaded], opts: AssembleOptions):
    """Group parts into units and cut each unit's head to the channels the join needs.

    Returns the units, the unit of each part, and for each unit a map from its source head
    channel (the part's, or the original's for a union) to its own head channel.
    """
    groups: dict[str, list[Loaded]] = {}
    for p in loaded:
        key = p.group if (opts.share == "union" and p.group) else f"part:{p.index}"
        groups.setdefault(key, []).append(p)
    units: list[Unit] = []
    owner: dict[int, int] = {}
    positions: list[dict[int, int]] = []
    for members in groups.values():
        lead = members[0]
        # Which source channels the join reads: the chosen ones and the background(s).
        # Calibration compares each part's confidence over its own categories, background
        # included, so every unit keeps its background channel then.
        wants_bg = opts.background == "max" or lead.index == 0 or opts.calibrate is not None
        if len(members) == 1:
            source, plan_parts = lead.model, None
            needed = {c for c in lead.chosen}
            if lead.background is not None and wants_bg:
                needed.add(lead.background)
        else:
            source, plan_parts = lead.original, members
            keys = label_keys(head_labels(source, find_head(source)))
            mine = [(m, c) for m in members for c in m.chosen]
            if lead.background is not None and wants_bg:
                mine.append((lead, lead.background))
            needed = {keys.index(label_keys(m.labels)[c]) for m, c in mine}
        needed_sorted = sorted(needed)
        if not needed_sorted:
            log.warning("part %d contributes no channel to the join; left out", lead.index)
            continue
        if plan_parts is not None:
            plan = union_plan(source, [m.plan for m in members], find_head(source), needed_sorted)
            model = extract(source, plan)
        elif len(needed_sorted) < lead.head.n_categories:
            model = cut_or_keep(source, lead.head, needed_sorted)
        else:
            model = None
        if model is None:
            model, mapping = source, {c: c for c in needed_sorted}
        else:
            mapping = {c: i for i, c in enumerate(needed_sorted)}
        k = len(units)
        units.append(Unit([m.index for m in members], model, find_head(model), f"p{lead.index}/"))
        positions.append(mapping)
        for m in members:
            owner[m.index] = k
    return units, owner, positions


def _channels(loaded, units, owner, positions, opts) -> tuple[list[Channel], list[Channel]]:
    """The joined output's channels, in the order asked, and its background channel(s)."""
    out: list[Channel] = []
    emitted: set[tuple[int, int]] = set()
    for p in loaded:
        if p.index not in owner:
            continue  # left out: nothing to join
        u = owner[p.index]
        for c in p.chosen:
            ch = positions[u][_source_channel(p, units[u], c)]
            if (u, ch) in emitted:  # a union computes a category once
                continue
            emitted.add((u, ch))
            out.append(Channel(u, ch, [p.index, p.labels[c]]))
    backgrounds: list[Channel] = []
    if loaded[0].head.spatial:
        if opts.background == "first":
            p = loaded[0]
            u = owner[0]
            ch = positions[u][_source_channel(p, units[u], p.background)]
            backgrounds.append(Channel(u, ch, [0, p.labels[p.background]]))
        else:
            seen = set()
            for p in loaded:
                u = owner[p.index]
                ch = positions[u][_source_channel(p, units[u], p.background)]
                if (u, ch) not in seen:
                    seen.add((u, ch))
                    backgrounds.append(Channel(u, ch, [-1, opts.background_category]))
    return out, backgrounds


def _source_channel(p: Loaded, unit: Unit, c: int) -> int:
    """A part's head channel as a channel of its unit's source head."""
    if len(unit.parts) == 1:
        return c
    assert p.original is not None
    keys = label_keys(head_labels(p.original, find_head(p.original)))
    return keys.index(label_keys(p.labels)[c])


def _fix_temperatures(units: list[Unit], temperatures: Sequence[float], n: int) -> None:
    if len(temperatures) != n:
        raise DataError(f"{len(temperatures)} temperatures for {n} parts; give one per part")
    for u in units:
        mine = {float(temperatures[i]) for i in u.parts}
        if len(mine) > 1:
            raise DataError(
                f"parts {u.parts} are assembled as one union and need one temperature, "
                f"not {sorted(mine)}"
            )
        u.temperature = mine.pop()


def _calibrate(model: ModelProto, units: list[Unit], positions, opts: AssembleOptions) -> None:
    infer_shapes(model)
    scores = [u.prefix + u.head.score for u in units]
    logits = calibration.collect(
        model,
        scores,
        opts.calibrate,
        limit=opts.calibrate_limit,
        axis=units[0].head.axis,
        provider=opts.provider,
        threads=opts.threads,
    )
    used = [z[:, sorted(set(m.values()))] for z, m in zip(logits, positions, strict=True)]
    for u, t in zip(units, calibration.fit(used), strict=True):
        u.temperature = t
        log.info("unit %s: temperature %.4f", u.prefix, t)


def _record(model, loaded, units, channels, backgrounds, output, shared, opts) -> None:
    cats = [b.origin for b in backgrounds[:1]] + [c.origin for c in channels]
    info = {
        "format": "onnxcut.assembly/1",
        "output": output,
        "parts": [
            {
                "model": p.source,
                "categories": [p.labels[c] for c in p.chosen],
                "unit": next((k for k, u in enumerate(units) if p.index in u.parts), None),
            }
            for p in loaded
        ],
        "units": [
            {"parts": u.parts, "prefix": u.prefix, "temperature": u.temperature} for u in units
        ],
        "background": (opts.background if loaded[0].head.spatial else None),
        "resized": opts.resize_outputs,
        "shared_nodes": shared,
        "calibrated": opts.calibrate is not None or opts.temperatures is not None,
    }
    meta = {CATEGORIES_KEY: json.dumps({output: cats}), ASSEMBLY_KEY: json.dumps(info)}
    for p in loaded:
        value = {e.key: e.value for e in p.model.metadata_props}.get(data.PREPROCESS_KEY)
        if value is not None:
            meta[data.PREPROCESS_KEY] = value
            break
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def _check(model: ModelProto) -> None:
    try:
        model.ByteSize()
    except Exception:  # over 2 GB: the checker cannot take it in memory
        return
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise AssertionError(f"assembled model fails the ONNX checker: {e}") from None
