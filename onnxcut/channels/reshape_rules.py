"""Channel rules for ops that change a tensor's rank or spatial size: Flatten, Reshape, Resize.

A reshape is followed only where it splits or merges axes without touching the channel axis's
own extent, or merges it with trailing axes (Flatten before a Gemm), or where it opens
ShuffleNet's channel shuffle: Reshape C -> (g, C/g), Transpose swapping the two, Reshape
back, which permutes the channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from onnxcut.channels.registry import (
    ChannelMap,
    EditContext,
    Tracer,
    axis_index,
    node_reason,
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
    shuffle = t.shuffles.pop(node.name, None)
    if shuffle is not None:
        _end_shuffle(t, node, shuffle)
        return
    cmap = t.get(node.input[0])
    if cmap is None:
        return
    src, dst = t.shape(node.input[0]), t.shape(node.output[0])
    target = t.value(node.input[1])
    found = _reshapeaxis_index(src, dst, cmap.axis) if src and dst and target else None
    if found is None or len(target) != len(dst):
        if not _start_shuffle(t, node, cmap):
            why = "reshapes across the channel axis (channel shuffle or dynamic reshape)"
            untraced(t, node, why)
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


@dataclass(frozen=True)
class _Shuffle:
    """A channel shuffle's splitting Reshape, waiting in Tracer.shuffles for its merge."""

    split: NodeProto
    cmap: ChannelMap  # the channels before the shuffle
    groups: int


def _start_shuffle(t: Tracer, node: NodeProto, cmap: ChannelMap) -> bool:
    """Recognise a Reshape that splits the channel axis into (g, C/g), read only by a
    Transpose that swaps the two axes, read only by a Reshape that merges them back."""
    ax, c = cmap.axis, len(cmap.slots)
    src, mid = t.shape(node.input[0]), t.shape(node.output[0])
    if src is None or mid is None or len(mid) != len(src) + 1 or src[ax] != c:
        return False
    g, k = mid[ax], mid[ax + 1]
    if not isinstance(g, int) or not isinstance(k, int) or g < 2 or g * k != c:
        return False
    if src[:ax] != mid[:ax] or src[ax + 1 :] != mid[ax + 2 :]:
        return False
    swap = _sole_reader(t, node.output[0], "Transpose")
    perm = list(range(len(mid)))
    perm[ax], perm[ax + 1] = ax + 1, ax
    if swap is None or list(attrs(swap).get("perm", [])) != perm:
        return False
    merge = _sole_reader(t, swap.output[0], "Reshape")
    if merge is None or merge.input[0] != swap.output[0] or t.shape(merge.output[0]) != src:
        return False
    t.shuffles[merge.name] = _Shuffle(node, cmap, g)
    return True


def _sole_reader(t: Tracer, name: str, op: str) -> NodeProto | None:
    readers = t.index.consumers.get(name, [])
    if len(readers) != 1 or readers[0].op_type != op:
        return None
    if name in t.index.outputs or name in t.subgraph_reads:
        return None
    return readers[0]


def _end_shuffle(t: Tracer, merge: NodeProto, shuffle: _Shuffle) -> None:
    """Permute the channels, or freeze them where a target shape cannot follow the cut.

    Output channel a * g + b is input channel b * (C/g) + a. Cut channels keep that order
    only if every block b keeps the same offsets a, so the g channels of one offset are
    coupled: a plan keeps or removes them together, and the targets get the new C/g and C.
    """
    split, cmap, g = shuffle.split, shuffle.cmap, shuffle.groups
    ax, c = cmap.axis, len(cmap.slots)
    k = c // g
    split_target, merge_target = t.value(split.input[1]), t.value(merge.input[1])
    split_fixed, merge_fixed = t.const(split.input[1]), t.const(merge.input[1])
    own = ("d", split.input[0], ax, True)  # the channel count of the shuffle's input
    # Known targets have the ranks of the shapes _start_shuffle checked.
    if split_target is None or merge_target is None:
        t.freeze(cmap, node_reason(merge, "ends a channel shuffle at a computed target shape"))
        return
    e_g, e_k, e_c = split_target[ax], split_target[ax + 1], merge_target[ax]
    others = [*split_target[:ax], *split_target[ax + 2 :], *merge_target[:ax]]
    others += merge_target[ax + 1 :]
    edit_k = e_k == ("c", k) and split_fixed is not None
    edit_c = e_c == ("c", c) and merge_fixed is not None
    if not (
        e_g in (("c", g), ("c", -1))
        and (edit_k or (e_k == ("c", -1) and e_g != e_k))
        and (edit_c or e_c in (("c", -1), own))
        and not any(e is not None and e[0] == "d" and e[3] for e in others)
    ):
        t.freeze(cmap, node_reason(merge, "ends a channel shuffle with targets it cannot update"))
        return
    blocks = cmap.slots.reshape(g, k)
    for b in range(1, g):
        t.couple(blocks[0], blocks[b])
    t.set(merge.output[0], ChannelMap(ax, blocks.T.reshape(-1)))

    def edit(ctx: EditContext) -> None:
        per_block = int(ctx.kept(blocks[0]).sum())
        if edit_k:
            new = split_fixed.copy()
            new[ax + 1] = per_block
            ctx.set_const(split, 1, new)
        if edit_c:
            new = merge_fixed.copy()
            new[ax] = per_block * g
            ctx.set_const(merge, 1, new)

    t.edit(merge, edit)


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
