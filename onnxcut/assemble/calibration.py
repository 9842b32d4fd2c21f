"""Per-part temperatures: put the logits of different models on one scale.

Each unit's confidence is the mean, over unlabeled images (and pixels), of its largest
softmax probability over its own categories, softmax(z / T). Every unit's T is fitted so
that its confidence equals the mean of the units' confidences at T = 1: an over-confident
part is cooled, an under-confident one sharpened, and the joined argmax compares logits of
one sharpness.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from onnx import ModelProto

from onnxcut import data
from onnxcut.errors import DataError
from onnxcut.graph.io import expose_tensors
from onnxcut.graph.shapes import dims, graph_inputs

log = logging.getLogger(__name__)

PIXELS_PER_IMAGE = 1024  # segmentation: pixels sampled per image for the fit
_LOG_T = (-7.0, 7.0)  # search range of log T


def collect(
    model: ModelProto,
    scores: Sequence[str],
    images: str | os.PathLike[str],
    *,
    limit: int,
    axis: int,
    provider: str = "cpu",
    threads: int | None = None,
) -> list[np.ndarray]:
    """Run the assembled model (temperatures 1) on the images; return each score tensor as
    (samples, categories) logits."""
    from onnxcut.runtime import session

    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise DataError(f"--calibrate reads images for one input; the model has {len(inputs)}")
    pre = data.fit_to_model(data.preprocess_from(model), model)
    paths = data.list_images(images)
    if len(paths) > limit:  # spread over the folder: sorted class folders would bias a prefix
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    shape = dims(inputs[0]) or []
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else 16
    sess = session(expose_tensors(model, scores), provider, threads)
    rng = np.random.default_rng(0)
    found: list[list[np.ndarray]] = [[] for _ in scores]
    for b in data.batches(paths, pre, batch):
        x = b.inputs
        real = len(x)
        if real < batch and isinstance(shape[0], int) and shape[0] > 0:
            x = np.concatenate([x, np.repeat(x[:1], batch - real, axis=0)])
        outs = sess.run(list(scores), {inputs[0].name: x})
        for k, out in enumerate(outs):
            z = np.moveaxis(out[:real], axis, -1).reshape(-1, out.shape[axis])  # (M, K)
            per_image = len(z) // real
            if per_image > PIXELS_PER_IMAGE:
                z = z[rng.choice(len(z), PIXELS_PER_IMAGE * real, replace=False)]
            found[k].append(z.astype(np.float64))
    return [np.concatenate(f) for f in found]


def confidence(logits: np.ndarray, temperature: float) -> float:
    """Mean largest softmax probability of (M, K) logits at a temperature."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    return float(np.mean(1.0 / np.exp(z).sum(axis=1)))


def fit(logits: Sequence[np.ndarray]) -> list[float]:
    """One temperature per unit, matching every unit's confidence to their mean at T = 1."""
    usable = [z.shape[1] > 1 for z in logits]
    base = [confidence(z, 1.0) for z, ok in zip(logits, usable, strict=True) if ok]
    if len(base) < 2:
        log.warning("fewer than two parts with several categories: nothing to calibrate")
        return [1.0] * len(logits)
    target = float(np.mean(base))
    temperatures = []
    for z, ok in zip(logits, usable, strict=True):
        if not ok:
            temperatures.append(1.0)
            continue
        lo, hi = _LOG_T
        for _ in range(60):  # confidence falls as T rises
            mid = (lo + hi) / 2
            if confidence(z, float(np.exp(mid))) > target:
                lo = mid
            else:
                hi = mid
        temperatures.append(float(np.exp((lo + hi) / 2)))
    return temperatures
