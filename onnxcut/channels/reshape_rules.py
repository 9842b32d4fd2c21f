"""Channel rules for ops that change a tensor's rank or spatial size: Flatten, Reshape, Resize.

A reshape is followed only where it splits or merges axes without touching the channel axis's
own extent, or merges it with trailing axes (Flatten before a Gemm).
"""

from __future__ import annotations

import math

import numpy as np
from onnx import NodeProto

from onnxcut.channels.registry import (
    ChannelMap,
    EditContext,
    Tracer,
    axis_index,
    rule,
    untraced,
)
from onnxcut.graph.io import attrs


@rule("Flatten")
def flatten(t: Tracer, node: NodeProto) -> None:
    cmap, shape = t.get(node.input[0]), t.shape(node.input[0])
    if cmap is None:
        return
    axis = axis_index(int(attrs(node).get("axis", 1)), len(shape or []))
    inner = shape[cmap.axis + 1 :] if shape else None
    outer = shape[axis : cmap.axis] if shape else []
    if shape is None or cmap.axis < axis or not all(isinstance(d, int) for d in inner + outer):
        untraced(t, node, "flattens channels with unknown or batch dims")
        return
    # Channel c becomes a block of prod(inner) features, repeated prod(outer) times.
    slots = np.tile(np.repeat(cmap.slots, math.prod(inner)), math.prod(outer))
    t.set(node.output[0], ChannelMap(1, slots))


@rule("Reshape")
def reshape(t: Tracer, node: NodeProto) -> None:
    cmap = t.get(node.input[0])
    if cmap is None:
        return
    src, dst = t.shape(node.input[0]), t.shape(node.output[0])
    target = t.value(node.input[1])
    found = _reshapeaxis_index(src, dst, cmap.axis) if src and dst and target else None
    if found is None or len(target) != len(dst):
        untraced(t, node, "reshapes across the channel axis (channel shuffle or dynamic reshape)")
        return
    b, m, k = found
    entry, fixed = target[b], t.const(node.input[1])
    copies = b == cmap.axis and m == k == 1 and entry in (("c", 0), ("d", *_own(node, cmap)))
    counted = entry is not None and entry[0] == "c" and entry[1] > 0 and fixed is not None
    others = [e for i, e in enumerate(target) if i != b]
    if any(e is not None and e[0] == "d" and e[3] for e in others) or not (
        entry == ("c", -1) or copies or counted
    ):
        untraced(t, node, "computes its target shape from the channel count")
        return
    t.set(node.output[0], ChannelMap(b, np.tile(np.repeat(cmap.slots, k), m)))
    if counted:

        def edit(ctx: EditContext) -> None:
            new = fixed.copy()
            new[b] = m * int(ctx.kept(cmap.slots).sum()) * k
            ctx.set_const(node, 1, new)

        t.edit(node, edit)


def _own(node: NodeProto, cmap: ChannelMap) -> tuple:
    return node.input[0], cmap.axis, True


def _reshapeaxis_index(src: list, dst: list, axis: int) -> tuple[int, int, int] | None:
    """Find the output axis b holding input channels: dst[b] = m * C * k, where m merges
    the input dims just before the channel axis and k those just after."""
    c = src[axis]
    lead = 0
    while lead < min(axis, len(dst)) and src[lead] == dst[lead]:
        lead += 1
    rest_src, rest_dst = src[lead:axis], dst[lead:]
    after = src[axis + 1 :]
    if not all(isinstance(d, int) for d in [c, *rest_src, *rest_dst, *after]):
        return None
    outer = math.prod(rest_src)
    before = {math.prod(rest_src[i:]) for i in range(len(rest_src) + 1)}
    inner = {math.prod(after[:i]) for i in range(len(after) + 1)}
    for b in range(len(rest_dst)):
        prefix = math.prod(rest_dst[:b])
        if outer % prefix or prefix > outer:
            return None
        m = outer // prefix
        if m in before and rest_dst[b] % (m * c) == 0 and rest_dst[b] // (m * c) in inner:
            return lead + b, m, rest_dst[b] // (m * c)
    return None


@rule("Resize", "Upsample")
def resize(t: Tracer, node: NodeProto) -> None:
    x = node.input[0]
    cmap = t.get(x)
    if cmap is None:
        return
    a = attrs(node)
    names = [*node.input, "", "", ""]
    scales_name = names[1] if node.op_type == "Upsample" else names[2]
    scales = a.get("scales") if node.op_type == "Upsample" and "scales" in a else None
    if scales is None and scales_name:
        scales = t.const(scales_name)
        if scales is None:
            untraced(t, node, "scales by computed factors")
            return
    if "axes" in a:
        untraced(t, node, "resizes selected axes")
        return
    if scales is not None and len(scales) and float(np.asarray(scales)[cmap.axis]) != 1.0:
        untraced(t, node, "resizes the channel axis")
        return
    t.set(node.output[0], cmap)
    sizes = names[3] if node.op_type == "Resize" else ""
    if not sizes:
        return
    value = t.value(sizes)
    entry = value[cmap.axis] if value is not None and len(value) > cmap.axis else None
    follows = entry is not None and entry[0] == "d" and entry[2] == cmap.axis
    if follows and np.array_equal(getattr(t.get(entry[1]), "slots", None), cmap.slots):
        return  # the sizes read the channel count of the input itself
    fixed = t.const(sizes)
    if fixed is None or entry != ("c", len(cmap.slots)):
        untraced(t, node, "resizes to computed sizes that fix the channel count")
        return

    def edit(ctx: EditContext) -> None:
        new = fixed.copy()
        new[cmap.axis] = int(ctx.kept(cmap.slots).sum())
        ctx.set_const(node, 3, new)

    t.edit(node, edit)
