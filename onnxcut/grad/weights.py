"""Parameter gradients of convolutions, as ONNX ops, for the rules in `nn`.

The weight gradient of a Conv is itself a convolution: correlate the input with the output
gradient, strides and dilations swapped. Batch and group axes are folded so that one grouped
Conv computes every group's (M/g, C/g, k...) block at once:
    A = x viewed (C/g, g*N, *spatial)           block gi holds group gi's input, per image
    K = dy transposed (M, N, *out)               output channel gi*M/g + m reads block gi
    Conv(A, K, group=g, strides=dilations, dilations=strides, pads) -> (C/g, M, >= k...)
cropped to the kernel and transposed to (M, C/g, k...). A dense 2-D Conv with static sizes
takes an im2col product instead (`_im2col_product`), which onnxruntime runs far faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxcut.grad.emitter import Emitter

INT64_MIN = -(2**63)


def conv_weight_grad(
    g: Emitter,
    inp: str,
    inp_shape: Sequence[int],
    dy: str,
    out_shape: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    group: int,
    pads: Sequence[int],
) -> str:
    """dL/dW of Conv(inp, W) whose output gradient is `dy`; both in the backward batch.

    `inp_shape` and `out_shape` are the Conv's input and output shapes (batch may be -1);
    W is (M, C/group, *kernel). A dense 2-D Conv with static sizes and padding takes the
    im2col product, any other the grouped correlation.
    """
    static = all(isinstance(d, int) and d > 0 for d in inp_shape[1:])
    dense_2d = group == 1 and len(kernel) == 2 and len(inp_shape) == 4
    if dense_2d and static and min(pads) >= 0:
        return _im2col_product(g, inp, inp_shape, dy, out_shape, kernel, strides, dilations, pads)
    return _grouped_correlation(g, inp, inp_shape, dy, kernel, strides, dilations, group, pads)


def _grouped_correlation(
    g: Emitter,
    inp: str,
    inp_shape: Sequence[int],
    dy: str,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    group: int,
    pads: Sequence[int],
) -> str:
    spatial = len(inp_shape) - 2
    cg = inp_shape[1] // group
    rest = list(inp_shape[2:])
    folded = g.op("Reshape", [inp, g.ints([-1, group, cg, *rest])])
    folded = g.op("Transpose", [folded], perm=[2, 1, 0, *range(3, 3 + spatial)])
    folded = g.op("Reshape", [folded, g.ints([cg, -1, *rest])])
    taps = g.op("Transpose", [dy], perm=[1, 0, *range(2, 2 + spatial)])
    corr = g.op(
        "Conv",
        [folded, taps],
        group=group,
        strides=list(dilations),
        dilations=list(strides),
        pads=list(pads),
    )
    axes = list(range(2, 2 + spatial))
    cropped = g.op("Slice", [corr, g.ints([0] * spatial), g.ints(list(kernel)), g.ints(axes)])
    return g.op("Transpose", [cropped], perm=[1, 0, *axes])


def _im2col_product(
    g: Emitter,
    inp: str,
    inp_shape: Sequence[int],
    dy: str,
    out_shape: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
) -> str:
    """dL/dW of a dense 2-D Conv as one batched MatMul over an im2col of the input.

    The im2col is one grouped Conv whose kernels are one-hot, each input channel giving one
    output channel per kernel tap, with the Conv's own strides, dilations and pads:
    (N, C*taps, Ho*Wo). With the output gradient viewed (N, Ho*Wo, M), the per-image
    products summed over the batch are dW as (C*taps, M). onnxruntime runs the grouped
    correlation of `conv_weight_grad` as one thin GEMM per input channel, and an im2col of
    strided Slices and a Concat spends more time copying than the GEMM does; this is one
    cheap Conv and one wide GEMM.
    """
    (kh, kw), channels = kernel, inp_shape[1]
    out_channels, positions = out_shape[1], out_shape[2] * out_shape[3]
    taps = kh * kw
    one_hot = np.tile(np.eye(taps).reshape(taps, 1, kh, kw), (channels, 1, 1, 1))
    cols = g.op(
        "Conv",
        [inp, g.array(one_hot, inp)],
        group=channels,
        kernel_shape=[kh, kw],
        strides=list(strides),
        dilations=list(dilations),
        pads=list(pads),
    )
    cols = g.op("Reshape", [cols, g.ints([0, channels * taps, -1])])
    rows = g.op("Reshape", [dy, g.ints([0, 0, -1])])
    rows = g.op("Transpose", [rows], perm=[0, 2, 1])  # (N, Ho*Wo, M)
    if positions >= out_channels:
        product = g.reduce_sum(g.op("MatMul", [cols, rows]), [0], keepdims=False)
        product = g.op("Transpose", [product], perm=[1, 0])  # (M, C * taps), channel-major
    else:  # the per-image products would outweigh the im2col: fold the batch in instead
        cols = g.op("Transpose", [cols], perm=[1, 0, 2])
        cols = g.op("Reshape", [cols, g.ints([channels * taps, -1])])
        rows = g.op("Reshape", [rows, g.ints([-1, out_channels])])
        # rows' cols' as one Gemm: its transposes cost nothing, a Transpose of the
        # (C * taps, M) product took 12 ms on a 512-channel layer.
        product = g.op("Gemm", [rows, cols], transA=1, transB=1)
    return g.op("Reshape", [product, g.ints([0, channels, kh, kw])])


def channel_sum(g: Emitter, dy: str, rank: int, axis: int = 1) -> str:
    """Sum a gradient over every axis but `axis`: a per-channel bias or scale gradient."""
    return g.reduce_sum(dy, [a for a in range(rank) if a != axis], keepdims=False)


def flipped_transposed(g: Emitter, w: str, shape: Sequence[int], group: int) -> str:
    """In-graph twin of `nn._flipped_transposed` for a weight that changes between runs
    (training): (M, C/g, k...) -> (C, M/g, k...) with every spatial axis reversed."""
    m, cg, *kernel = shape
    spatial = len(kernel)
    grouped = g.op("Reshape", [w, g.ints([group, m // group, cg, *kernel])])
    swapped = g.op("Transpose", [grouped], perm=[0, 2, 1, *range(3, 3 + spatial)])
    merged = g.op("Reshape", [swapped, g.ints([group * cg, m // group, *kernel])])
    axes = list(range(2, 2 + spatial))
    backwards = g.ints([-1] * spatial)
    return g.op(
        "Slice", [merged, backwards, g.ints([INT64_MIN] * spatial), g.ints(axes), backwards]
    )
