"""Channel rules for ops that move, split, join or pad the channel axis.

Also tracks shape vectors (Shape -> Gather/Slice/Concat -> Reshape or Resize), so that a
dynamic reshape is accepted only where its target does not hard-code a channel count.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import NodeProto

from onnxcut.channels.registry import (
    PAD,
    SHAPE_READERS,
    ChannelMap,
    EditContext,
    Tracer,
    axis_index,
    node_reason,
    opset_of,
    rule,
    untraced,
    write_ints,
)
from onnxcut.graph.io import attrs

SHAPE_READERS.update(
    {
        ("Gather", 0),
        ("Slice", 0),
        ("Unsqueeze", 0),
        ("Squeeze", 0),
        ("Cast", 0),
        ("Identity", 0),
        ("Reshape", 1),
        ("Resize", 3),
        *(("Concat", i) for i in range(64)),
    }
)


def _ints(t: Tracer, node: NodeProto, i: int, attr: str, opset_split: int) -> list[int] | None:
    """Read an integer list from input `i` (opset >= opset_split) or attribute `attr`."""
    if opset_of(t) < opset_split:
        value = attrs(node).get(attr)
        return None if value is None else [int(v) for v in value]
    if len(node.input) <= i or not node.input[i]:
        return None
    c = t.const(node.input[i])
    return None if c is None else [int(v) for v in c.reshape(-1)]


def _traced_input(t: Tracer, node: NodeProto) -> tuple[ChannelMap, int] | None:
    """The channel map and rank of a node's first input; None (freezing if it is traced but
    of unknown rank) when the rule has nothing to follow."""
    cmap = t.get(node.input[0])
    rank = t.rank(node.input[0])
    if cmap is not None and rank is None:
        untraced(t, node, "has an input of unknown rank")
    if cmap is None or rank is None:
        return None
    return cmap, rank


@rule("Transpose")
def transpose(t: Tracer, node: NodeProto) -> None:
    traced = _traced_input(t, node)
    if traced is None:
        return
    cmap, rank = traced
    perm = list(attrs(node).get("perm", range(rank - 1, -1, -1)))
    t.set(node.output[0], ChannelMap(perm.index(cmap.axis), cmap.slots))


@rule("Unsqueeze", "Squeeze")
def squeeze(t: Tracer, node: NodeProto) -> None:
    x = node.input[0]
    if x in t.values:
        t.values[node.output[0]] = t.values[x]
    cmap = t.get(x)
    if cmap is None:
        return
    axes = _ints(t, node, 1, "axes", 13)
    rank_out, rank_in = t.rank(node.output[0]), t.rank(x)
    if rank_out is None or rank_in is None:
        untraced(t, node, "has tensors of unknown rank")
        return
    if axes is None:  # Squeeze without axes drops every size-1 dim
        axes = [i for i, d in enumerate(t.shape(x)) if d == 1]
    if node.op_type == "Unsqueeze":
        inserted = sorted(axis_index(a, rank_out) for a in axes)
        kept_axes = [i for i in range(rank_out) if i not in inserted]
        t.set(node.output[0], ChannelMap(kept_axes[cmap.axis], cmap.slots))
        return
    removed = [axis_index(a, rank_in) for a in axes]
    if cmap.axis in removed:
        untraced(t, node, "squeezes the channel axis away")
        return
    t.set(node.output[0], ChannelMap(cmap.axis - sum(a < cmap.axis for a in removed), cmap.slots))


@rule("Concat")
def concat(t: Tracer, node: NodeProto) -> None:
    names, out = list(node.input), node.output[0]
    maps = [t.get(n) for n in names]
    if not any(maps):
        if any(n in t.values for n in names):
            parts = [t.value(n) for n in names]
            if all(p is not None for p in parts):
                t.values[out] = [e for p in parts for e in p]
            else:
                untraced(t, node, "joins shape vectors it cannot follow")
        return
    rank = t.rank(out)
    axes = {m.axis for m in maps if m is not None}
    if rank is None or len(axes) > 1:
        untraced(t, node, "joins tensors whose channels lie on different axes")
        return
    caxis = axes.pop()
    axis = axis_index(int(attrs(node)["axis"]), rank)
    first = next(m for m in maps if m is not None)
    parts = []
    for i, (name, m) in enumerate(zip(names, maps, strict=True)):
        if m is not None:
            if axis != caxis and len(m.slots) != len(first.slots):
                untraced(t, node, "joins mismatched channel counts")
                return
            if axis != caxis:
                t.couple(first.slots, m.slots)
            parts.append(m.slots)
            continue
        shape = t.shape(name)
        d = shape[caxis] if shape is not None else None
        if not isinstance(d, int) or (axis != caxis and d != len(first.slots)):
            untraced(t, node, f"joins untraced tensor '{name}' of unknown channel count")
            return
        # A constant part carries constant channels, sliced with whatever they couple to.
        slots = t.new_slots(PAD, f"{node.name}:{i}", d) if axis == caxis else first.slots
        if not t.slice_const(node, i, caxis, slots):
            if axis != caxis:
                untraced(t, node, f"joins untraced tensor '{name}' along another axis")
                return
            t.freeze(slots, node_reason(node, f"joins untraced tensor '{name}'"))
        parts.append(slots)
    slots = np.concatenate(parts) if axis == caxis else first.slots
    t.set(out, ChannelMap(caxis, slots))


@rule("Split")
def split(t: Tracer, node: NodeProto) -> None:
    traced = _traced_input(t, node)
    if traced is None:
        return
    cmap, rank = traced
    a = attrs(node)
    if axis_index(int(a.get("axis", 0)), rank) != cmap.axis:
        for out in node.output:
            t.set(out, cmap)
        return
    opset, n, c = opset_of(t), len(node.output), len(cmap.slots)
    if len(node.input) > 1 and node.input[1]:
        sizes = _ints(t, node, 1, "split", 13)
    elif "split" in a:
        sizes = [int(s) for s in a["split"]]
    else:
        step = math.ceil(c / n)
        sizes = [step] * (n - 1) + [c - step * (n - 1)]
    if sizes is None or sum(sizes) != c:
        untraced(t, node, "splits channels at computed sizes")
        return
    bounds = np.cumsum([0, *sizes])
    segments = [cmap.slots[bounds[k] : bounds[k + 1]] for k in range(n)]
    for out, seg in zip(node.output, segments, strict=True):
        t.set(out, ChannelMap(cmap.axis, seg))

    def edit(ctx: EditContext) -> None:
        new = [int(ctx.kept(seg).sum()) for seg in segments]
        write_ints(ctx, node, 1, "split" if opset < 13 else "", new, np.int64)
        if "num_outputs" in a:
            ctx.set_attr(node, "num_outputs", None)

    t.edit(node, edit)


@rule("Slice")
def slice_(t: Tracer, node: NodeProto) -> None:
    x = node.input[0]
    if x in t.values:
        _slice_value(t, node)
    cmap = t.get(x)
    if cmap is None:
        return
    old = opset_of(t) < 10
    starts, ends = _ints(t, node, 1, "starts", 10), _ints(t, node, 2, "ends", 10)
    axes, steps = _ints(t, node, 3, "axes", 10), None if old else _ints(t, node, 4, "", 10)
    rank = t.rank(x)
    if starts is None or ends is None or rank is None:
        untraced(t, node, "slices at computed bounds")
        return
    axes = [axis_index(v, rank) for v in (axes if axes is not None else range(len(starts)))]
    if cmap.axis not in axes:
        t.set(node.output[0], cmap)
        return
    j = axes.index(cmap.axis)
    if steps is not None and steps[j] != 1:
        untraced(t, node, "slices channels with a step")
        return
    c = len(cmap.slots)
    s, e = (min(max(v + c if v < 0 else v, 0), c) for v in (starts[j], ends[j]))
    seg, before = cmap.slots[s:e], cmap.slots[:s]
    t.set(node.output[0], ChannelMap(cmap.axis, seg))
    dtype = np.int64 if old else t.const(node.input[1]).dtype

    def edit(ctx: EditContext) -> None:
        begin = int(ctx.kept(before).sum())
        new_starts, new_ends = list(starts), list(ends)
        new_starts[j], new_ends[j] = begin, begin + int(ctx.kept(seg).sum())
        write_ints(ctx, node, 1, "starts" if old else "", new_starts, dtype)
        write_ints(ctx, node, 2, "ends" if old else "", new_ends, dtype)

    t.edit(node, edit)


def _slice_value(t: Tracer, node: NodeProto) -> None:
    value = t.values[node.input[0]]
    bounds = [_ints(t, node, i, "", 10) for i in (1, 2, 3, 4)]
    if bounds[0] is None or bounds[1] is None or (bounds[2] not in (None, [0])):
        untraced(t, node, "slices a shape vector at computed bounds")
        return
    step = bounds[3][0] if bounds[3] else 1
    t.values[node.output[0]] = value[bounds[0][0] : bounds[1][0] : step]


@rule("Gather")
def gather(t: Tracer, node: NodeProto) -> None:
    x, idx = node.input[0], t.const(node.input[1])
    if x in t.values and idx is not None and idx.ndim <= 1 and attrs(node).get("axis", 0) == 0:
        value = t.values[x]
        t.values[node.output[0]] = [value[int(i)] for i in idx.reshape(-1)]
    elif x in t.values or t.get(x) is not None:
        untraced(t, node, "gathers along a traced axis")


@rule("Shape")
def shape(t: Tracer, node: NodeProto) -> None:
    x = node.input[0]
    cmap, rank = t.get(x), t.rank(x)
    if rank is None:
        untraced(t, node, "reads a shape of unknown rank")
        return
    a = attrs(node)
    start, end = axis_index(int(a.get("start", 0)), rank), a.get("end")
    end = rank if end is None else min(axis_index(int(end), rank), rank)
    channel = cmap.axis if cmap is not None else -1
    t.values[node.output[0]] = [("d", x, i, i == channel) for i in range(start, end)]


@rule("Pad")
def pad(t: Tracer, node: NodeProto) -> None:
    traced = _traced_input(t, node)
    if traced is None:
        return
    cmap, rank = traced
    a = attrs(node)
    old = opset_of(t) < 11
    pads = _ints(t, node, 1, "pads" if "pads" in a else "paddings", 11)
    axes = None if old else _ints(t, node, 3, "", 11)
    if pads is None:
        untraced(t, node, "pads by computed amounts")
        return
    axes = [axis_index(v, rank) for v in (axes if axes is not None else range(rank))]
    if cmap.axis not in axes:
        t.set(node.output[0], cmap)
        return
    j, n = axes.index(cmap.axis), len(axes)
    begin, end = pads[j], pads[j + n]
    if begin == 0 and end == 0:
        t.set(node.output[0], cmap)
        return
    mode = a.get("mode", b"constant")
    if begin < 0 or end < 0 or mode not in (b"constant", "constant"):
        untraced(t, node, "crops or reflects along the channel axis")
        return
    head, tail = t.new_slots(PAD, node.name, begin), t.new_slots(PAD, node.name, end)
    t.set(node.output[0], ChannelMap(cmap.axis, np.concatenate([head, cmap.slots, tail])))
    dtype = np.int64 if old else t.const(node.input[1]).dtype

    def edit(ctx: EditContext) -> None:
        new = list(pads)
        new[j], new[j + n] = int(ctx.kept(head).sum()), int(ctx.kept(tail).sum())
        write_ints(ctx, node, 1, "pads" if old else "", new, dtype)

    t.edit(node, edit)
