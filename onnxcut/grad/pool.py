"""VJP rules for pooling and reductions."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from onnxcut.errors import UnsupportedOpError
from onnxcut.grad.emitter import Emitter, Site
from onnxcut.grad.nn import conv_pads
from onnxcut.grad.registry import vjp


def _pool_window(s: Site, spatial: int) -> tuple[list[int], list[int]]:
    if any(int(d) != 1 for d in s.attrs.get("dilations", [])):
        raise UnsupportedOpError(s.node, "dilated pooling has no VJP rule")
    kernel = [int(k) for k in s.attrs["kernel_shape"]]
    strides = [int(v) for v in s.attrs.get("strides", [1] * spatial)]
    return kernel, strides


@vjp("MaxPool")
def max_pool(g: Emitter, s: Site):
    if int(s.attrs.get("storage_order", 0)):
        raise UnsupportedOpError(s.node, "storage_order=1 has no VJP rule")
    if len(s.node.output) > 1 and s.node.output[1]:
        indices = s.node.output[1]
    else:
        # Extend the forward node. onnxruntime then runs its slower MaxPool kernel with
        # Indices (`benchmarks/grad_throughput.py --profile` shows its time).
        indices = g.fresh(f"{s.node.name}_indices")
        if len(s.node.output) > 1:
            s.node.output[1] = indices
        else:
            s.node.output.append(indices)
    # Indices count from the start of the whole forward tensor, so scatter into one flat row
    # per category copy: no Mod, and the indices are shared by every copy.
    dy = g.op("Reshape", [g.op("Reshape", [s.g, g.split_target(s.y)]), g.ints([0, -1])])
    rows = g.op("Shape", [dy], start=0, end=1)
    flat = g.op("Expand", [g.op("Reshape", [indices, g.ints([1, -1])]), g.op("Shape", [dy])])
    zeros = g.op(
        "Reshape",
        [g.zeros_like(s.x), g.op("Concat", [rows, g.ints([-1])], axis=0)],
    )
    # MaxUnpool would assign, losing contributions where windows overlap; scatter adds.
    dx = g.op("ScatterElements", [zeros, flat, dy], axis=1, reduction="add")
    return (g.op("Reshape", [dx, g.reshape_target(s.x)]),)


def _counts(size: int, out: int, k: int, stride: int, begin: int, end: int, full: bool):
    """Elements each output position averages over, along one axis (as onnxruntime counts)."""
    counts = []
    for o in range(out):
        start = o * stride - begin
        stop = min(start + k, size + end)
        counts.append(stop - start if full else min(stop, size) - max(start, 0))
    return np.asarray(counts, np.float64)


@vjp("AveragePool")
def average_pool(g: Emitter, s: Site):
    xs = g.static_shape(s.x, s.node)
    ys = g.static_shape(s.y, s.node)
    sizes, outs = list(xs[2:]), list(ys[2:])
    kernel, strides = _pool_window(s, len(sizes))
    begins, ends = conv_pads(s.attrs, sizes, kernel, strides, [1] * len(sizes))
    full = bool(int(s.attrs.get("count_include_pad", 0)))
    divisor = np.ones((), np.float64)
    for axis in range(len(sizes)):
        c = _counts(
            sizes[axis], outs[axis], kernel[axis], strides[axis], begins[axis], ends[axis], full
        )
        divisor = np.multiply.outer(divisor, c)
    dy = g.mul(s.g, g.array(1.0 / divisor, s.y))
    # Spread each output over its window: a one-channel ConvTranspose of ones, per plane.
    crop = [
        max((o - 1) * st + k - b - n, 0)
        for o, st, k, b, n in zip(outs, strides, kernel, begins, sizes, strict=True)
    ]
    extra = [
        n - ((o - 1) * st + k - b - c)
        for n, o, st, k, b, c in zip(sizes, outs, strides, kernel, begins, crop, strict=True)
    ]
    planes = g.op("Reshape", [dy, g.ints([-1, 1, *outs])])
    spread = g.op(
        "ConvTranspose",
        [planes, g.array(np.ones((1, 1, *kernel)), s.y)],
        kernel_shape=kernel,
        strides=strides,
        pads=begins + crop,
        output_padding=extra,
    )
    return (g.op("Reshape", [spread, g.reshape_target(s.x)]),)


@vjp("GlobalAveragePool")
def global_average_pool(g: Emitter, s: Site):
    xs = g.static_shape(s.x, s.node)
    dy = g.mul(s.g, g.scalar(1.0 / float(np.prod(xs[2:])), s.y))
    return (g.op("Expand", [dy, g.ints([1, 1, *xs[2:]])]),)


@vjp("GlobalMaxPool")
def global_max_pool(g: Emitter, s: Site):
    # Every position equal to the maximum receives the gradient (ties share it in full).
    is_max = g.op("Cast", [g.op("Equal", [s.x, s.y])], to=g.index.dtype(s.x) or TensorProto.FLOAT)
    return (g.times(s.g, is_max, s.x, s.y, result=s.x),)


def _reduced_axes(g: Emitter, s: Site, rank: int) -> list[int] | None:
    """The axes a Reduce node sums over, or None when it passes the input through."""
    if "axes" in s.attrs:
        axes = [int(a) for a in s.attrs["axes"]]
    elif s.input(1):
        value = g.value(s.input(1))
        if value is None:
            raise UnsupportedOpError(s.node, "computed reduction axes have no VJP rule")
        axes = [int(a) for a in value.reshape(-1)]
    else:
        axes = []
    if not axes:
        return None if int(s.attrs.get("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(a % rank for a in axes)


@vjp("ReduceSum", "ReduceMean")
def reduce(g: Emitter, s: Site):
    axes = _reduced_axes(g, s, g.rank(s.x, s.node))
    if axes is None:
        return (s.g, None)
    xs = g.static_shape(s.x, s.node, axes)
    dy = s.g
    if not int(s.attrs.get("keepdims", 1)):
        dy = g.op("Unsqueeze", [dy, g.ints(axes)])
    if s.node.op_type == "ReduceMean":
        dy = g.mul(dy, g.scalar(1.0 / float(np.prod([xs[a] for a in axes])), s.y))
    target = [xs[a] if a in axes else 1 for a in range(len(xs))]
    return (g.op("Expand", [dy, g.ints(target)]), None)
