"""VJP rules for parameter layers: Conv, ConvTranspose, BatchNormalization,
LayerNormalization, Gemm, MatMul.

Each rule gives the input's gradient and, where a weight is differentiated (a graph input
during training), the weight's and bias's. BatchNormalization's running statistics never get
one: they are frozen in inference mode.
"""

from __future__ import annotations

import numpy as np

from onnxcut.errors import UnsupportedOpError
from onnxcut.grad.emitter import Emitter, Site, decoded
from onnxcut.grad.registry import vjp
from onnxcut.grad.weights import channel_sum, conv_weight_grad, flipped_transposed


def _window(g: Emitter, s: Site, spatial: int) -> tuple[list[int], list[int], list[int]]:
    """Kernel, strides and dilations of a Conv-like node with `spatial` spatial axes."""
    w = s.node.input[1]
    kernel = s.attrs.get("kernel_shape") or list(g.static_shape(w, s.node)[2:])
    strides = s.attrs.get("strides") or [1] * spatial
    dilations = s.attrs.get("dilations") or [1] * spatial
    return [int(k) for k in kernel], [int(v) for v in strides], [int(v) for v in dilations]


def conv_pads(
    attrs: dict, sizes: list[int], kernel: list[int], strides: list[int], dilations: list[int]
) -> tuple[list[int], list[int]]:
    """Explicit (begin, end) pads of a Conv or pool, resolving auto_pad against input sizes."""
    auto = decoded(attrs.get("auto_pad", "NOTSET"))
    n = len(sizes)
    if auto in ("NOTSET", ""):
        pads = [int(p) for p in attrs.get("pads", [0] * 2 * n)]
        return pads[:n], pads[n:]
    if auto == "VALID":
        return [0] * n, [0] * n
    begins, ends = [], []
    for size, k, st, d in zip(sizes, kernel, strides, dilations, strict=True):
        out = -(-size // st)
        total = max((out - 1) * st + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins, ends


def _flipped_transposed(weight: np.ndarray, group: int) -> np.ndarray:
    """Conv weight (M, C/g, k...) -> the weight of its adjoint Conv, (C, M/g, k...) flipped."""
    m, cg = weight.shape[:2]
    k = weight.shape[2:]
    grouped = weight.reshape(group, m // group, cg, *k).swapaxes(1, 2)
    spatial = tuple(range(3, 3 + len(k)))
    return np.flip(grouped, axis=spatial).reshape(group * cg, m // group, *k)


@vjp("Conv")
def conv(g: Emitter, s: Site):
    x = s.x
    xs = g.static_shape(x, s.node)
    ys = g.static_shape(s.y, s.node)
    kernel, strides, dilations = _window(g, s, len(xs) - 2)
    group = int(s.attrs.get("group", 1))
    begins, ends = conv_pads(s.attrs, list(xs[2:]), kernel, strides, dilations)
    dw = db = None
    if s.needs[1]:
        pads = begins + ends
        dw = conv_weight_grad(g, g.fwd(x), xs, s.g, ys, kernel, strides, dilations, group, pads)
    if s.input(2) and s.needs[2]:
        db = channel_sum(g, s.g, len(ys))
    dx = _conv_input_grad(g, s, xs, ys, kernel, strides, dilations, group, begins, ends)
    return (dx, dw, db)


def _conv_input_grad(g: Emitter, s: Site, xs, ys, kernel, strides, dilations, group, begins, ends):
    if not s.needs[0]:
        return None
    w = s.node.input[1]
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    full_begins = [e - 1 - b for e, b in zip(extents, begins, strict=True)]
    full_ends = [e - 1 - p for e, p in zip(extents, ends, strict=True)]
    weight = g.value(w)
    # Stride 1: a Conv with the flipped kernel, far faster than a depthwise ConvTranspose. A
    # trained (non-constant) dense kernel goes to ConvTranspose instead: flipping it in the
    # graph costs more than it saves (benchmarks/train_speed.py).
    dense_trained = weight is None and group == 1
    if set(strides) == {1} and min(full_begins + full_ends) >= 0 and not dense_trained:
        flipped = (
            g.array(_flipped_transposed(weight, group), w)
            if weight is not None
            else flipped_transposed(g, w, g.static_shape(w, s.node), group)
        )
        return g.op(
            "Conv",
            [s.g, flipped],
            kernel_shape=kernel,
            dilations=dilations,
            group=group,
            pads=full_begins + full_ends,
        )
    # output_shape would be simpler, but onnxruntime mis-pads it when pads are asymmetric.
    out_padding = [
        size - ((o - 1) * st + e - b - p)
        for size, o, st, e, b, p in zip(xs[2:], ys[2:], strides, extents, begins, ends, strict=True)
    ]
    return g.op(
        "ConvTranspose",
        [s.g, w],
        kernel_shape=kernel,
        strides=strides,
        dilations=dilations,
        group=group,
        pads=begins + ends,
        output_padding=out_padding,
    )


def _transpose_pads(attrs: dict, xs, ys, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """ConvTranspose begin pads, and the end pads of its adjoint Conv (negative: crop)."""
    auto = decoded(attrs.get("auto_pad", "NOTSET"))
    n = len(kernel)
    out_padding = [int(v) for v in attrs.get("output_padding", [0] * n)]
    begins = []
    for i in range(n):
        full = (xs[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
        total = full + out_padding[i] - ys[2 + i]
        if auto in ("NOTSET", "") and "output_shape" not in attrs:
            begins.append(int(attrs.get("pads", [0] * 2 * n)[i]))
        elif auto == "VALID":
            begins.append(0)
        elif auto == "SAME_UPPER":
            begins.append(total // 2)
        else:
            begins.append(total - total // 2)
    ends = [
        (xs[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - begins[i] - ys[2 + i]
        for i in range(n)
    ]
    return begins, ends


@vjp("ConvTranspose")
def conv_transpose(g: Emitter, s: Site):
    x, w = s.node.input[:2]
    xs = g.static_shape(x, s.node)
    ys = g.static_shape(s.y, s.node)
    kernel, strides, dilations = _window(g, s, len(xs) - 2)
    begins, ends = _transpose_pads(s.attrs, xs, ys, kernel, strides, dilations)
    dy, dy_shape = s.g, list(ys)
    if min(ends) < 0:
        # output_padding past the cropped end: those rows saw no input, so drop them.
        spatial = list(range(2, len(xs)))
        stops = [ys[a] + min(e, 0) for a, e in zip(spatial, ends, strict=True)]
        dy = g.op("Slice", [dy, g.ints([0] * len(spatial)), g.ints(stops), g.ints(spatial)])
        ends = [max(e, 0) for e in ends]
        dy_shape[2:] = stops
    group = int(s.attrs.get("group", 1))
    # ConvTranspose(x, W) is the adjoint of Conv(., W) from its output's shape to x's: so
    # its input gradient is that Conv of dy, and W's gradient correlates dy with x.
    dx = dw = db = None
    if s.needs[0]:
        dx = g.op(
            "Conv",
            [dy, w],
            kernel_shape=kernel,
            strides=strides,
            dilations=dilations,
            group=group,
            pads=begins + ends,
        )
    if s.needs[1]:  # the adjoint Conv's weight gradient: its input is dy, its output x
        pads, fx = begins + ends, g.fwd(x)
        dw = conv_weight_grad(g, dy, dy_shape, fx, xs, kernel, strides, dilations, group, pads)
    if s.input(2) and s.needs[2]:
        db = channel_sum(g, s.g, len(ys))
    return (dx, dw, db)


@vjp("BatchNormalization")
def batch_norm(g: Emitter, s: Site):
    """Inference mode: y = x^ scale + bias, x^ = (x - mean) / sqrt(var + eps) per channel."""
    if int(s.attrs.get("training_mode", 0)):
        raise UnsupportedOpError(s.node, "training_mode=1 has no inference-mode gradient")
    rank = g.rank(s.x, s.node)
    scale, mean, var = s.node.input[1], s.node.input[3], s.node.input[4]
    eps = float(s.attrs.get("epsilon", 1e-5))
    per_channel = [-1, *[1] * (rank - 2)]
    if g.value(var) is not None:
        inv_std = g.array((1.0 / np.sqrt(g.value(var).astype(np.float64) + eps)), s.x)
    else:
        inv_std = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.scalar(eps, var)])])])
    dx = dscale = dbias = None
    if s.needs[0]:
        if g.value(scale) is not None and g.value(var) is not None:
            factor = g.value(scale) / np.sqrt(g.value(var).astype(np.float64) + eps)
            factor_name = g.array(factor.reshape(per_channel), s.x)
        else:
            factor_name = g.op("Reshape", [g.mul(scale, inv_std), g.ints(per_channel)])
        dx = g.mul(s.g, factor_name)
    if s.needs[1]:
        shift = g.op("Reshape", [mean, g.ints(per_channel)])
        normed = g.mul(g.op("Sub", [s.x, shift]), g.op("Reshape", [inv_std, g.ints(per_channel)]))
        dscale = channel_sum(g, g.times(s.g, normed, s.x, s.y), rank)
    if s.needs[2]:
        dbias = channel_sum(g, s.g, rank)
    return (dx, dscale, dbias, None, None)


@vjp("LayerNormalization")
def layer_norm(g: Emitter, s: Site):
    """dx = (g' - mean(g') - x^ mean(g' x^)) / sigma, g' = dy * scale, means over the
    normalised axes; x^ and 1/sigma are recomputed from the forward input."""
    if int(s.attrs.get("stash_type", 1)) != 1:
        raise UnsupportedOpError(s.node, "stash_type other than float has no VJP rule")
    rank = g.rank(s.x, s.node)
    axes = list(range(int(s.attrs.get("axis", -1)) % rank, rank))
    xs = g.static_shape(s.x, s.node, axes)
    inv_count = g.scalar(1.0 / float(np.prod([xs[a] for a in axes])), s.x)

    def mean(t: str) -> str:
        return g.mul(g.reduce_sum(t, axes), inv_count)

    centred = g.op("Sub", [s.x, mean(s.x)])
    variance = g.op(
        "Add", [mean(g.mul(centred, centred)), g.scalar(float(s.attrs.get("epsilon", 1e-5)), s.x)]
    )
    inv_sigma = g.op("Reciprocal", [g.op("Sqrt", [variance])])
    normed = g.mul(centred, inv_sigma)
    scaled = g.times(s.g, s.node.input[1], s.node.input[1], s.y)
    dot = mean(g.times(scaled, normed, s.x, s.y))
    inner = g.op("Sub", [g.op("Sub", [scaled, mean(scaled)]), g.mul(dot, g.tile_like(normed, s.x))])
    dx = g.times(inner, inv_sigma, s.x, s.y) if s.needs[0] else None
    dscale = dbias = None
    if s.needs[1]:
        dscale = g.unbroadcast(g.times(s.g, normed, s.x, s.y), s.node.input[1], s.y, s.node)
    if s.input(2) and s.needs[2]:
        dbias = g.unbroadcast(s.g, s.node.input[2], s.y, s.node)
    return (dx, dscale, dbias)


def _swap_last(g: Emitter, name: str, rank: int) -> str:
    value = g.value(name)
    if value is not None:
        return g.const(np.ascontiguousarray(np.swapaxes(value, -1, -2)), "transposed")
    perm = [*range(rank - 2), rank - 1, rank - 2]
    return g.op("Transpose", [g.fwd(name)], perm=perm)


@vjp("Gemm")
def gemm(g: Emitter, s: Site):
    a, b = s.node.input[:2]
    alpha = float(s.attrs.get("alpha", 1.0))
    beta = float(s.attrs.get("beta", 1.0))
    trans_a = int(s.attrs.get("transA", 0))
    trans_b = int(s.attrs.get("transB", 0))
    dy = s.g if alpha == 1.0 else g.mul(s.g, g.scalar(alpha, s.y))
    da = db = dc = None
    if s.needs[0]:
        # dA' = dY B'^T, and A = A'^T when transA.
        da = g.op("Gemm", [dy, g.fwd(b)], transB=0 if trans_b else 1)
        da = g.op("Transpose", [da], perm=[1, 0]) if trans_a else da
    if s.needs[1]:
        db = g.op("Gemm", [g.fwd(a), dy], transA=0 if trans_a else 1)
        db = g.op("Transpose", [db], perm=[1, 0]) if trans_b else db
    if len(s.node.input) > 2 and s.needs[2]:
        scaled = s.g if beta == 1.0 else g.mul(s.g, g.scalar(beta, s.y))
        dc = g.unbroadcast(scaled, s.node.input[2], s.y, s.node)
    return (da, db, dc)


@vjp("MatMul")
def matmul(g: Emitter, s: Site):
    a, b = s.node.input[:2]
    ra, rb = g.rank(a, s.node), g.rank(b, s.node)
    if min(ra, rb) < 2:
        raise UnsupportedOpError(s.node, "MatMul with a 1-D operand has no VJP rule")
    ys = g.index.shape(s.y)
    assert ys is not None
    da = db = None
    if s.needs[0]:
        da = g.op("MatMul", [s.g, _swap_last(g, b, rb)])
        a_dims = g.index.shape(a)
        da = g.unbroadcast(da, a, [*ys[:-1], a_dims[-1]], s.node)
    if s.needs[1]:
        db = g.op("MatMul", [_swap_last(g, a, ra), s.g])
        b_dims = g.index.shape(b)
        db = g.unbroadcast(db, b, [*ys[:-2], b_dims[-2], ys[-1]], s.node)
    return (da, db)
