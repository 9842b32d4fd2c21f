"""Channel rules for parameter layers, channel-wise ops, elementwise ops and reductions.

Each rule reads its node's input channel maps from the Tracer, sets its outputs' maps, and
records the initializers and attributes that follow the channels. A rule that cannot prove
the channels pass safely freezes them with a reason.
"""

from __future__ import annotations

import numpy as np
from onnx import NodeProto

from onnxcut.channels.registry import (
    PRODUCER,
    ChannelMap,
    EditContext,
    Tracer,
    node_reason,
    opset_of,
    rule,
    untraced,
)
from onnxcut.errors import PlanError
from onnxcut.graph.io import attrs

# fmt: off
# Ops that act on every element alone: output channel c depends on input channel c only.
UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log",
    "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf",
    "Identity", "Cast", "Clip", "Dropout",
)
# Pooling over the spatial axes (2 and after) of an NC... tensor.
SPATIAL = (
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
)
ELEMENTWISE = (
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
    "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod",
)
REDUCE = (
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
)
# fmt: on


@rule(*UNARY)
def same(t: Tracer, node: NodeProto) -> None:
    cmap = t.get(node.input[0])
    for out in node.output:  # Dropout's mask has the data's shape
        t.set(out, cmap)
    if node.input[0] in t.values:
        t.values[node.output[0]] = t.values[node.input[0]]


@rule(*SPATIAL)
def spatial(t: Tracer, node: NodeProto) -> None:
    cmap = t.get(node.input[0])
    if cmap is None:
        return
    if cmap.axis != 1:
        t.freeze(cmap, node_reason(node, f"pools over axis {cmap.axis}, which carries channels"))
        return
    t.set(node.output[0], cmap)
    indices = node.output[1] if len(node.output) > 1 else ""
    if indices and (t.index.consumers.get(indices) or indices in t.index.outputs):
        t.freeze(cmap, node_reason(node, "returns indices that encode channel positions"))


@rule("BatchNormalization", "InstanceNormalization")
def channelwise(t: Tracer, node: NodeProto) -> None:
    """Per-channel statistics and affine parameters (InstanceNorm: per channel and image)."""
    cmap = t.get(node.input[0])
    if cmap is None:
        return
    if cmap.axis != 1:
        t.freeze(cmap, node_reason(node, f"normalises axis 1, channels are on axis {cmap.axis}"))
        return
    for i in range(1, len(node.input)):
        if not t.slice_const(node, i, 0, cmap.slots):
            untraced(t, node, f"has computed parameter '{node.input[i]}'")
    t.set(node.output[0], cmap)


@rule(*ELEMENTWISE)
def elementwise(t: Tracer, node: NodeProto) -> None:
    """Broadcasting ops: mapped inputs of equal length couple; constants follow channels."""
    names = list(node.input)
    mapped = [(i, n, t.get(n)) for i, n in enumerate(names) if t.get(n) is not None]
    if not mapped:
        return
    out = node.output[0]
    ranks = [t.rank(n) for n in names]
    rank = t.rank(out)
    if rank is None or None in ranks:
        untraced(t, node, "has inputs of unknown rank")
        return
    axes = {m.axis + rank - ranks[i] for i, _, m in mapped}
    if len(axes) > 1:
        untraced(t, node, "combines channels from different axes")
        return
    axis = axes.pop()
    length = max(len(m.slots) for _, _, m in mapped)
    full = next(m for _, _, m in mapped if len(m.slots) == length)
    for _, _, m in mapped:
        if len(m.slots) == length:
            t.couple(full.slots, m.slots)
        elif len(m.slots) != 1:
            untraced(t, node, "broadcasts mismatched channel counts")
            return
    for i, name in enumerate(names):
        if not name or t.get(name) is not None:
            continue
        ax = axis - (rank - ranks[i])
        d = t.shape(name)[ax] if ax >= 0 else 1  # rank is known, so is the shape list
        if d == 1 or (length == 1 and d == length):
            continue
        if d != length or not t.slice_const(node, i, ax, full.slots):
            t.freeze(full, node_reason(node, f"combines channels with untraced tensor '{name}'"))
    t.set(out, ChannelMap(axis, full.slots))


@rule(*REDUCE)
def reduce(t: Tracer, node: NodeProto) -> None:
    cmap = t.get(node.input[0])
    if cmap is None:
        return
    a = attrs(node)
    rank = t.rank(node.input[0])
    if "axes" in a:
        axes = list(a["axes"])
    elif len(node.input) > 1 and node.input[1]:
        given = t.const(node.input[1])
        if given is None:
            t.freeze(cmap, node_reason(node, "reduces over computed axes"))
            return
        axes = given.reshape(-1).tolist()
    else:
        axes = [] if a.get("noop_with_empty_axes", 0) else list(range(rank or 0))
    axes = [x + rank if x < 0 else x for x in axes] if rank else axes
    if rank is None or cmap.axis in axes:
        t.freeze(cmap, node_reason(node, "mixes channels without weights (reduces over them)"))
        return
    shift = 0 if a.get("keepdims", 1) else sum(x < cmap.axis for x in axes)
    t.set(node.output[0], ChannelMap(cmap.axis - shift, cmap.slots))


@rule("Softmax", "LogSoftmax", "Hardmax", "ArgMax", "ArgMin", "LayerNormalization")
def along_axis(t: Tracer, node: NodeProto) -> None:
    """Ops that normalise or select along one axis (LayerNorm: the axis and all after)."""
    cmap = t.get(node.input[0])
    rank = t.rank(node.input[0])
    if cmap is None:
        return
    a = attrs(node)
    opset = opset_of(t)
    coerced = node.op_type == "LayerNormalization" or (
        node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and opset < 13
    )
    default = 0 if node.op_type.startswith("Arg") else (1 if coerced and opset < 13 else -1)
    axis = int(a.get("axis", default))
    axis = axis + rank if rank is not None and axis < 0 else axis
    mixed = cmap.axis >= axis if coerced else cmap.axis == axis
    if mixed and _renormalising_head(t, node, cmap, axis):
        # A classifier's Softmax over its categories: cutting categories (the plan's outputs
        # section) renormalises over the kept ones, so the argmax stays the original's
        # argmax restricted to them. Nothing else can cut these channels: they reach a
        # graph output.
        t.set(node.output[0], cmap)
        return
    if rank is None or mixed:
        t.freeze(cmap, node_reason(node, "mixes channels without weights"))
        return
    shift = int(node.op_type.startswith("Arg") and not a.get("keepdims", 1) and axis < cmap.axis)
    t.set(node.output[0], ChannelMap(cmap.axis - shift, cmap.slots))


@rule("LRN", "GroupNormalization", "MeanVarianceNormalization", "SpaceToDepth", "DepthToSpace")
def mixing(t: Tracer, node: NodeProto) -> None:
    untraced(t, node, "mixes channels without weights")


def _renormalising_head(t: Tracer, node: NodeProto, cmap: ChannelMap, axis: int) -> bool:
    """A Softmax or LogSoftmax over exactly the channel axis whose result is a graph output."""
    return (
        node.op_type in ("Softmax", "LogSoftmax")
        and cmap.axis == axis
        and node.output[0] in t.index.outputs
    )


# -- parameter layers ---------------------------------------------------------------------
def _input_map(t: Tracer, node: NodeProto, axis: int) -> ChannelMap | None:
    """The traced channels a parameter layer reads on `axis`; any other axis freezes them."""
    cmap = t.get(node.input[0])
    if cmap is not None and cmap.axis != axis:
        t.freeze(cmap, node_reason(node, f"reads channels on axis {axis}, not {cmap.axis}"))
        return None
    return cmap


def _bias(t: Tracer, node: NodeProto, i: int, out: np.ndarray) -> None:
    if len(node.input) > i and node.input[i] and not t.slice_const(node, i, 0, out):
        reason = node_reason(node, f"has computed bias '{node.input[i]}'")
        t.freeze(out, reason)
        t.freeze(t.get(node.input[i]), reason)


@rule("Conv")
def conv(t: Tracer, node: NodeProto) -> None:
    w = t.const(node.input[1])
    if w is None:
        untraced(t, node, "has computed weights")
        return
    group = int(attrs(node).get("group", 1))
    cmap = _input_map(t, node, 1)
    cout, cin_g = w.shape[:2]
    if cmap is not None and len(cmap.slots) != cin_g * group:
        untraced(t, node, "reads a channel count its weights do not match")
        return
    if group > 1 and cin_g == 1 and cmap is not None:
        # Depthwise: output channel o filters input channel o // multiplier alone.
        out = np.repeat(cmap.slots, cout // group)
        t.slice_const(node, 1, 0, out)
        _bias(t, node, 2, out)
        t.edit(node, lambda ctx: ctx.set_attr(node, "group", int(ctx.kept(cmap.slots).sum())))
        t.consumer(node, cmap.slots)
        t.set(node.output[0], ChannelMap(1, out))
        return
    out = t.new_slots(PRODUCER, node.name, cout)
    if cmap is not None:
        t.slice_const(node, 1, 1, cmap.slots, consume=True, groups=group)
        t.consumer(node, cmap.slots)
    t.slice_const(node, 1, 0, out)
    _bias(t, node, 2, out)
    if group > 1:
        if cmap is None:
            t.freeze(out, node_reason(node, f"is grouped (group={group}) over untraced channels"))
        else:
            t.edit(node, _grouped_check(node, group, cmap.slots, out))
            t.blocks += [(cmap.slots, group), (out, group)]
    t.set(node.output[0], ChannelMap(1, out))


def _grouped_check(node: NodeProto, group: int, cin: np.ndarray, cout: np.ndarray):
    def check(ctx: EditContext) -> None:
        for side, slots in (("input", cin), ("output", cout)):
            counts = ctx.kept(slots).reshape(group, -1).sum(axis=1).tolist()
            if len(set(counts)) > 1:
                raise PlanError(
                    f"node '{node.name}' (Conv, group={group}) would keep {counts} {side} "
                    "channels per group; keep the same number in every group"
                )

    return check


@rule("ConvTranspose")
def conv_transpose(t: Tracer, node: NodeProto) -> None:
    w = t.const(node.input[1])
    if w is None:
        untraced(t, node, "has computed weights")
        return
    group = int(attrs(node).get("group", 1))
    cmap = _input_map(t, node, 1)
    cin, cout_g = w.shape[:2]
    if cmap is not None and len(cmap.slots) != cin:
        untraced(t, node, "reads a channel count its weights do not match")
        return
    if group > 1 and cmap is not None and group == cin:
        out = np.repeat(cmap.slots, cout_g)
        t.slice_const(node, 1, 0, cmap.slots)
        _bias(t, node, 2, out)
        t.edit(node, lambda ctx: ctx.set_attr(node, "group", int(ctx.kept(cmap.slots).sum())))
        t.consumer(node, cmap.slots)
        t.set(node.output[0], ChannelMap(1, out))
        return
    if group > 1:
        untraced(t, node, f"is grouped (group={group})")
        return
    out = t.new_slots(PRODUCER, node.name, cout_g)
    if cmap is not None:
        t.slice_const(node, 1, 0, cmap.slots, consume=True)
        t.consumer(node, cmap.slots)
    t.slice_const(node, 1, 1, out)
    _bias(t, node, 2, out)
    t.set(node.output[0], ChannelMap(1, out))


@rule("Gemm")
def gemm(t: Tracer, node: NodeProto) -> None:
    a = attrs(node)
    b = t.const(node.input[1])
    if b is None or a.get("transA", 0):
        untraced(t, node, "has computed weights" if b is None else "transposes its input")
        return
    trans_b = bool(a.get("transB", 0))
    cmap = _input_map(t, node, 1)
    out = t.new_slots(PRODUCER, node.name, b.shape[0] if trans_b else b.shape[1])
    if cmap is not None:
        t.slice_const(node, 1, 1 if trans_b else 0, cmap.slots, consume=True)
        t.consumer(node, cmap.slots)
    t.slice_const(node, 1, 0 if trans_b else 1, out)
    if len(node.input) > 2 and node.input[2]:
        shape = t.shape(node.input[2]) or []
        if shape and shape[-1] != 1 and not t.slice_const(node, 2, len(shape) - 1, out):
            _bias(t, node, 2, out)
        else:
            t.freeze(t.get(node.input[2]), node_reason(node, "adds a traced tensor as bias"))
    t.set(node.output[0], ChannelMap(1, out))


@rule("MatMul")
def matmul(t: Tracer, node: NodeProto) -> None:
    b = t.const(node.input[1])
    rank = t.rank(node.input[0])
    if b is None or b.ndim < 2 or rank is None or rank < 2 or t.get(node.input[1]):
        untraced(t, node, "multiplies computed tensors")
        return
    cmap = _input_map(t, node, rank - 1)
    out = t.new_slots(PRODUCER, node.name, b.shape[-1])
    if cmap is not None:
        t.slice_const(node, 1, b.ndim - 2, cmap.slots, consume=True)
        t.consumer(node, cmap.slots)
    t.slice_const(node, 1, b.ndim - 1, out)
    t.set(node.output[0], ChannelMap(max(rank, b.ndim) - 1, out))
