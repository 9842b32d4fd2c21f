"""Parameter gradients of convolutions, as ONNX ops, for the rules in `nn`.

The weight gradient of a Conv is itself a convolution: correlate the input with the output
gradient, strides and dilations swapped. Batch and group axes are folded so that one grouped
Conv computes every group's (M/g, C/g, k...) block at once:
    A = x viewed (C/g, g*N, *spatial)           block gi holds group gi's input, per image
    K = dy transposed (M, N, *out)               output channel gi*M/g + m reads block gi
    Conv(A, K, group=g, strides=dilations, dilations=strides, pads) -> (C/g, M, >= k...)
cropped to the kernel and transposed to (M, C/g, k...).
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxcut.grad.emitter import Emitter

INT64_MIN = -(2**63)


def conv_weight_grad(
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
    """dL/dW of Conv(inp, W) whose output gradient is `dy`; both in the backward batch.

    `inp_shape` is the input's shape (batch may be -1); W is (M, C/group, *kernel).
    """
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


def conv_weight_grad_matmul(
    g: Emitter,
    inp: str,
    inp_shape: Sequence[int],
    dy: str,
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    pads: Sequence[int],
) -> str | None:
    """dL/dW of a dense 2-D Conv as one MatMul over an im2col of the input, or None where
    that does not apply (see `use_matmul`).

    The input goes channel-last, each kernel tap is one strided Slice of it, the taps are
    concatenated on the channel axis: (N*Ho*Wo, taps*C), the output gradient is viewed
    (M, N*Ho*Wo), and dW = dy @ patches, (M, taps*C) -> (M, C, kh, kw). onnxruntime runs
    the grouped correlation of `conv_weight_grad` as one thin GEMM per input channel; this
    runs one wide GEMM instead.
    """
    h, w = inp_shape[2:]
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    top, left, bottom, right = pads
    out_h = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    out_w = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    channels = inp_shape[1]
    nhwc = g.op("Transpose", [inp], perm=[0, 2, 3, 1])
    padded = g.op("Pad", [nhwc, g.ints([0, top, left, 0, 0, bottom, right, 0])])
    taps = [
        g.op(
            "Slice",
            [
                padded,
                g.ints([a * dh, b * dw]),
                g.ints([a * dh + (out_h - 1) * sh + 1, b * dw + (out_w - 1) * sw + 1]),
                g.ints([1, 2]),
                g.ints([sh, sw]),
            ],
        )
        for a in range(kh)
        for b in range(kw)
    ]
    patches = g.op("Concat", taps, axis=3) if len(taps) > 1 else taps[0]
    patches = g.op("Reshape", [patches, g.ints([-1, kh * kw * channels])])
    grads = g.op("Transpose", [dy], perm=[1, 0, 2, 3])
    grads = g.op("Reshape", [grads, g.ints([0, -1])])
    product = g.op("MatMul", [grads, patches])  # (M, taps * C), tap-major
    product = g.op("Reshape", [product, g.ints([0, kh, kw, channels])])
    return g.op("Transpose", [product], perm=[0, 3, 1, 2])


def use_matmul(inp_shape: Sequence[int], kernel: Sequence[int], group: int, pads) -> bool:
    """The im2col MatMul applies to dense 2-D Convs with static spatial sizes and padding."""
    static = all(isinstance(d, int) and d > 0 for d in inp_shape[1:])
    return group == 1 and len(kernel) == 2 and len(inp_shape) == 4 and static and min(pads) >= 0


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
