"""Public entry points: `gradients()` and `channel_sums()`, over three backends."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from onnx import ModelProto

from onnxcut.errors import DataError, OnnxcutError
from onnxcut.graph.io import load

BACKENDS = ("symbolic", "finite-diff", "ort-training")


def gradients(
    model: str | os.PathLike[str] | ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    output: str,
    category: int,
    axis: int = 1,
    mask: np.ndarray | None = None,
    backend: str = "symbolic",
) -> dict[str, np.ndarray]:
    """Return dS/dT for each T in `wrt`, with T's shape.

    S is the sum over `mask` (None: everything; else broadcast against the taken slice) of
    `output` taken at index `category` along `axis`. For many images or categories, build a
    `GradientSession` once instead.
    """
    _check_backend(backend)
    if backend == "finite-diff":
        raise OnnxcutError(
            "the finite-diff backend gives per-channel sums only; call channel_sums(..., "
            "backend='finite-diff') or use --grad symbolic"
        )
    if backend == "ort-training":
        from onnxcut.grad.orttraining import ort_gradients

        return ort_gradients(load(model), feeds, list(wrt), output, category, axis, mask)
    from onnxcut.grad.session import GradientSession

    # One call, one set of feeds: their shapes fix every dynamic dim the rules need.
    shapes = {name: list(np.shape(value)) for name, value in feeds.items()}
    result = GradientSession(model, wrt, output, axis, input_shapes=shapes).run(
        feeds, [category], mask
    )
    return {name: result.gradients[name][0] for name in wrt}


def channel_sums(
    model: str | os.PathLike[str] | ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    output: str,
    category: int,
    axis: int = 1,
    mask: np.ndarray | None = None,
    backend: str = "symbolic",
    positive: bool = False,
) -> dict[str, np.ndarray]:
    """Return {T: (N, C)} sums of dS/dT over each channel (axis 1) of each T.

    `positive` sums max(dS/dT, 0) instead; the finite-diff backend cannot, and refuses.
    """
    _check_backend(backend)
    if backend == "finite-diff":
        if positive:
            raise OnnxcutError(
                "the finite-diff backend gives signed channel sums only; positive-part sums "
                "need element-wise gradients: use --grad symbolic"
            )
        from onnxcut.grad.finitediff import channel_sums as fd_sums

        if not category >= 0:
            raise DataError(f"category {category} is out of range: categories start at 0")
        return fd_sums(load(model), feeds, list(wrt), output, category, axis, mask)
    grads = gradients(model, feeds, wrt, output, category, axis, mask, backend)
    return {name: reduce_channels(g, positive) for name, g in grads.items()}


def reduce_channels(grad: np.ndarray, positive: bool = False, first_spatial: int = 2):
    """Sum a gradient over its spatial axes, from `first_spatial` on (positive part if asked).

    (N, C, H, W) -> (N, C); a session's (K, N, C, H, W) with first_spatial=3 -> (K, N, C).
    """
    part = np.maximum(grad, 0) if positive else grad
    return part.sum(axis=tuple(range(first_spatial, part.ndim)), dtype=np.float64)


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise OnnxcutError(
            f"gradient backend '{backend}' unknown; choose one of {', '.join(BACKENDS)}"
        )
