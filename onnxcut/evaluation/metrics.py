"""evaluate(): segmentation mIoU or classification top-1, plus size and latency.

Category-customised evaluation (`classes`): ground truth of the other categories counts as
background, and a model predicts by the argmax over background plus the chosen categories. A
sub-network's output channels map back to the original categories through the
`onnxcut.categories` metadata that `extract` writes.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto

from onnxcut import data
from onnxcut.attribution.probe import (
    CATEGORIES_KEY,
    Head,
    find_head,
    output_categories,
    resize_masks,
)
from onnxcut.channels.inspection import summarize
from onnxcut.errors import DataError
from onnxcut.graph.io import load
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes
from onnxcut.runtime import session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    masks: str | None = None
    classes: tuple[int, ...] | None = None
    background: int = 0
    output: str | None = None
    category_axis: int | None = None
    provider: str = "cpu"
    threads: int | None = None
    latency_runs: int = 20
    class_names: tuple[str, ...] | None = None
    limit: int | None = None  # evaluate the first N images only


def _candidates(
    cats: list[int], classes: Sequence[int] | None, background: int | None, source: str
) -> np.ndarray:
    """Output channels that take part in the argmax."""
    if classes is None:
        return np.arange(len(cats))
    wanted = sorted({*classes, *([background] if background is not None else [])})
    missing = [c for c in wanted if c not in cats]
    if missing:
        raise DataError(
            f"{source}: categories {missing} are not among its outputs "
            f"({cats}); evaluate it with --classes from those"
        )
    # Every channel naming a wanted category: assembled parts may share a category.
    return np.array([i for i, c in enumerate(cats) if c in wanted])


def evaluate(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    options: EvalOptions | None = None,
) -> dict[str, Any]:
    """Score a model on an image folder; see the module doc for the customised task."""
    opts = options or EvalOptions()
    proto = load(model)
    if default_batch_inplace(proto):
        infer_shapes(proto)
    head = find_head(proto, opts.output, opts.category_axis, "identity")
    cats = output_categories(proto, head)
    pre = data.fit_to_model(data.preprocess_from(proto), proto)
    root = Path(images)
    paths = data.list_images(root)[: opts.limit]
    sess = session(proto, opts.provider, opts.threads)
    input_name = sess.get_inputs()[0].name
    report = _sizes(proto, sess, input_name, pre, opts)
    if head.spatial:
        report.update(_segmentation(sess, input_name, head, cats, paths, root, pre, opts, model))
    else:
        report.update(_classification(sess, input_name, head, cats, paths, root, pre, opts, model))
    return report


def _sizes(
    proto: ModelProto, sess, input_name: str, pre: data.Preprocess, opts: EvalOptions
) -> dict[str, Any]:
    summary = summarize(proto)
    shape = [1, 3, *pre.size] if pre.layout == "nchw" else [1, *pre.size, 3]
    shape[1 if pre.layout == "nchw" else 3] = pre.n_channels
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(3):
        sess.run(None, {input_name: x})
    times = []
    for _ in range(opts.latency_runs):
        t0 = time.perf_counter()
        sess.run(None, {input_name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "params": summary["params"],
        "flops": summary["flops"],
        "latency_ms": statistics.median(times),
        "latency_runs": opts.latency_runs,
    }


def _predict(
    sess, input_name: str, head: Head, x: np.ndarray, channels: np.ndarray, cats: list[int]
) -> np.ndarray:
    out = sess.run([head.output], {input_name: x})[0]
    out = np.moveaxis(out, head.axis, 1)[:, channels]
    return np.asarray(cats)[channels][np.argmax(out, axis=1)]


def _segmentation(sess, input_name, head, cats, paths, root, pre, opts, model) -> dict:
    if not opts.masks:
        raise DataError("segmentation evaluation needs label masks: pass --masks DIR")
    mask_dir = Path(opts.masks)
    if not mask_dir.is_dir():
        raise DataError(f"--masks {mask_dir}: not a folder")
    sub = cats is not None
    cats = cats if sub else list(range(head.n_categories))
    classes = opts.classes
    if sub and classes is None:  # a sub-network is scored on the categories it kept
        classes = tuple(c for c in cats if c != opts.background)
    channels = _candidates(cats, classes, opts.background, str(model))
    # Labels a sub-network dropped are remapped below, so only the full model bounds them.
    bound = data.IGNORE_LABEL if sub else head.n_categories
    n = max(cats) + 1
    confusion = np.zeros((n, n), np.int64)
    used = missing = 0
    for path in paths:
        found = data.mask_path(mask_dir, path, root)
        image = data.read_image(path, pre) if found is not None else None
        if image is None:
            missing += 1
            continue
        try:
            truth = data.read_mask(found, image.shape[:2], bound)
        except DataError as e:
            if "out of range" not in str(e):
                raise
            raise DataError(
                f"{e}; if {model} is a sub-network it needs its {CATEGORIES_KEY} "
                "metadata (written by onnxcut extract) to map outputs back"
            ) from None
        pred = _predict(sess, input_name, head, data.to_input(image, pre)[None], channels, cats)[0]
        truth = resize_masks(truth, pred.shape)
        if classes is not None:
            keep = np.isin(truth, [*classes, data.IGNORE_LABEL])
            truth = np.where(keep, truth, opts.background)
        valid = truth != data.IGNORE_LABEL
        confusion += np.bincount(truth[valid] * n + pred[valid], minlength=n * n).reshape(n, n)
        used += 1
    if not used:
        raise DataError(f"no image in {root} has a label mask in {mask_dir}; check --masks")
    if missing:
        log.warning(
            "%d of %d images had no label mask (or were unreadable) and were skipped",
            missing,
            len(paths),
        )
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    evaluated = [cats[c] for c in channels]
    iou = {str(c): float(tp[c] / union[c]) for c in evaluated if union[c] > 0}
    result = {
        "task": "segment",
        "images": used,
        "images_without_mask": missing,
        "miou": float(np.mean(list(iou.values()))) if iou else 0.0,
        "per_class": iou,
        "pixel_accuracy": float(tp.sum() / max(confusion.sum(), 1)),
    }
    if classes is not None:
        chosen = [iou[str(c)] for c in classes if str(c) in iou]
        result["classes"] = list(classes)
        result["miou_classes"] = float(np.mean(chosen)) if chosen else 0.0
    return result


def _classification(sess, input_name, head, cats, paths, root, pre, opts, model) -> dict:
    mapping = data.class_folders(root, opts.class_names)
    sub = cats is not None  # a sub-network may keep categories 0..k-1 and still be one
    if not sub:
        cats = list(range(head.n_categories))
    channels = _candidates(cats, opts.classes, None, str(model))
    wanted = set(opts.classes) if opts.classes is not None else set(cats)
    if not sub and max(mapping.values()) >= head.n_categories:
        raise DataError(
            f"class folders go up to {max(mapping.values())}, the model has "
            f"{head.n_categories} outputs; a sub-network needs its "
            f"{CATEGORIES_KEY} metadata (written by onnxcut extract)"
        )
    correct: dict[int, list[int]] = {}
    for path in paths:
        label = mapping[path.relative_to(root).parts[0]]
        if label not in wanted:
            continue
        image = data.read_image(path, pre)
        if image is None:
            continue
        pred = _predict(sess, input_name, head, data.to_input(image, pre)[None], channels, cats)[0]
        correct.setdefault(label, []).append(int(pred == label))
    if not correct:
        raise DataError(f"no image of the evaluated classes under {root}")
    hits = [h for v in correct.values() for h in v]
    return {
        "task": "classify",
        "images": len(hits),
        "top1": float(np.mean(hits)),
        "per_class": {str(k): float(np.mean(v)) for k, v in sorted(correct.items())},
    }
