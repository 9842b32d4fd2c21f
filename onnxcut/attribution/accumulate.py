"""Per-batch accumulation of attribute(): masks, one backward call, quantised vectors.

For image n of a batch, slot p of the backward run differentiates its p-th present
category; slots an image does not need keep a zero mask. Each image's vectors are reduced
on their own, in float64, then quantised, so the sums do not depend on the batching.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxcut.attribution.gradient_runner import GradientRunner
from onnxcut.attribution.probe import Head, probabilities, resize_masks
from onnxcut.attribution.relevance import Route
from onnxcut.attribution.scores import Scores, quantize


def groups(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def stack(inputs: list[np.ndarray], size: int) -> np.ndarray:
    """A batch of `size`: the inputs, then zero images (whose slots stay unused)."""
    x = np.zeros((size, *inputs[0].shape), inputs[0].dtype)
    x[: len(inputs)] = inputs
    return x


def accumulate(
    scores: Scores,
    runner: GradientRunner,
    group: list[tuple[np.ndarray, float, Any]],
    size: int,
    head: Head,
    task: str,
    route: Route | None = None,
) -> None:
    """Add the vectors of a group of (input, tau, label) images, one forward and one backward."""
    x = stack([item[0] for item in group], size)
    score, outputs, extras = runner.forward(x)
    probs = np.moveaxis(probabilities(score, head, outputs), head.axis, 1)  # (N, K, ...)
    # Padding images at the end of the batch have no group entry: zip stops before them.
    found = [
        _masks(p, head, task, tau, label) for p, (_, tau, label) in zip(probs, group, strict=False)
    ]
    slots = max(len(present) for _, present in found)
    if slots == 0:
        return
    # Slot j of image n differentiates its j-th present category; the rest stay zero.
    categories = np.zeros((slots, size), np.int64)
    weights = np.zeros((slots, size, *found[0][0].shape[1:]), np.float32)
    for n, (masks, present) in enumerate(found):
        categories[: len(present), n] = present
        weights[: len(present), n] = masks[present]
    acts, grads = runner.gradients(x, categories, weights)
    for n, (masks, present) in enumerate(found):
        if present.size == 0:
            continue
        image_acts = {name: a[n] for name, a in acts.items()}
        image_grads = {name: g[: len(present), n] for name, g in grads.items()}
        _add_image(scores, runner, image_acts, image_grads, masks[present], present)
        if route is not None:
            _add_relevance(scores, route, {t: v[n : n + 1] for t, v in extras.items()}, present)
        scores.count[present] += 1


def _masks(probs: np.ndarray, head: Head, task: str, tau: float, label):
    """One image's masks (K, ...) at the output's size and its present categories."""
    if task == "segment":
        masks = probs > tau  # (K, H, W)
        if label is not None:
            label = resize_masks(label, masks.shape[1:])  # image size -> output size
            masks &= label[None] == np.arange(head.n_categories)[:, None, None]
        return masks, np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    k = int(label) if label is not None else int(np.argmax(probs))
    present = np.array([k] if probs[k] >= tau else [], np.int64)
    return np.ones((head.n_categories,), bool), present


def _add_image(scores: Scores, runner: GradientRunner, acts, grads, masks, present) -> None:
    """One image's quantised forward, backward and Taylor vectors of every probed layer.

    `acts` {layer: (C, ...)} and `grads` {layer: (P, C, ...)} in the layer's own layout.
    """
    for name in runner.layers:
        axis = runner.axes[name]  # channels first: (C, h, w) or (C,), (P, C, h, w) or (P, C)
        f = np.moveaxis(acts[name], axis - 1, 0)
        g = np.moveaxis(grads[name], axis, 1)
        if f.ndim == 1:
            f, g = f[:, None, None], g[:, :, None, None]
        # Masked sums over pixels as matrix products (BLAS, not einsum's loops), in the
        # feature maps' float32; the sums are normalised and quantised in float64.
        m = _resize(masks, f.shape[1:]).reshape(len(present), -1, 1).astype(np.float32)
        f = f.reshape(len(f), -1).astype(np.float32, copy=False)  # (C, hw)
        g = g.reshape(*g.shape[:2], -1).astype(np.float32, copy=False)  # (P, C, hw)
        # Magnitudes: a feature map that no ReLU follows (a residual branch before its Add)
        # carries signal in negative values too; after a ReLU this is the plain sum.
        fsum = (np.abs(f) @ m)[..., 0].astype(np.float64)  # (P, C)
        gsum = (np.maximum(g, 0) @ m)[..., 0].astype(np.float64)
        scores.arrays[f"forward/{name}"][present] += quantize(_normalise(fsum))
        scores.arrays[f"backward/{name}"][present] += quantize(_normalise(gsum))
        # First-order change of S_k when channel c is zeroed: |sum_M F_c dS_k/dF_c|.
        tsum = np.abs(((g * f) @ m)[..., 0].astype(np.float64))
        scores.arrays[f"taylor/{name}"][present] += quantize(_normalise(tsum))


def _add_relevance(scores: Scores, route: Route, extras: dict, present: np.ndarray) -> None:
    """Model LEGO: route relevance of the probed layers' channels, per present class."""
    magnitudes = {
        name: np.abs(np.moveaxis(extras[t][0], route.axes[name] - 1, 0))
        .reshape(extras[t].shape[route.axes[name]], -1)
        .sum(1, dtype=np.float64)
        for name, t in route.outputs.items()
        if t in extras  # the head's output is the score itself, not an extra
    }
    for k in present.tolist():
        relevance = route.run(extras, magnitudes, k)
        for name, r in relevance.items():
            key = f"relevance/{name}"
            if key in scores.arrays:
                scores.arrays[key][k] += quantize(_normalise(np.maximum(r, 0)[None]))[0]


def _normalise(v: np.ndarray) -> np.ndarray:
    total = v.sum(axis=-1, keepdims=True)
    return np.divide(v, total, out=np.zeros_like(v), where=total > 0)


def _resize(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if masks.ndim == 1:  # classifiers: the whole feature map
        return np.ones((len(masks), *size), bool)
    return resize_masks(masks, size)
