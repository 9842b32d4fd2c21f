"""attribute(): per-layer, per-category channel scores streamed over an image folder.

Segmentation (Disassembler): for image i and category k the high-confidence mask M is the
pixels whose probability for k exceeds tau (and, with label masks, whose label is k).
    forward  f = sum_{p in M} |F[c, p]| normalised over channels c
    backward b = sum_{p in M} relu(dS_k/dF[c, p]) normalised, S_k = sum_{p in M} score[k, p]
    taylor   t = |sum_{p in M} F[c, p] dS_k/dF[c, p]| normalised (the first-order change of
             S_k when channel c is zeroed; an addition to the papers' two vectors)
with M resized (nearest) to each feature map F. Classification (CNN LEGO): an image counts
for the class it is predicted as (or labelled, in an ImageFolder) with probability >= tau; the
sums run over the whole feature map and S is the class logit.
Each image's vectors are quantised and added to per-category sums, so memory stays flat and
shards, resumed runs and single runs agree bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcut import data
from onnxcut.attribution.gradient_runner import GradientRunner
from onnxcut.attribution.probe import (
    Head,
    channel_counts,
    find_head,
    probabilities,
    probe_layers,
    resize_masks,
)
from onnxcut.attribution.relevance import Route
from onnxcut.attribution.scores import Scores, load_scores, quantize, save_scores
from onnxcut.errors import DataError, ModelError
from onnxcut.graph.io import load, sha256
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributeOptions:
    task: str = "auto"  # auto, segment or classify
    tau: float = 0.9
    output: str | None = None
    category_axis: int | None = None
    probs: str | None = None
    layers: tuple[str, ...] | None = None
    batch: int = 8  # images per progress and checkpoint step (each image runs alone)
    provider: str = "cpu"
    threads: int | None = None
    grad: str = "symbolic"
    shard: str | None = None
    masks: str | None = None  # label-mask folder (segment)
    class_names: tuple[str, ...] | None = None
    preprocess_file: str | None = None  # JSON; overrides the model's metadata
    preprocess: dict[str, Any] = field(default_factory=dict)  # flag overrides, key by key
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    checkpoint_every: int = 64  # images between checkpoints
    objective: str = "logit"  # S_k sums the score (logit) or its log-softmax (logprob)
    top_k: int | None = None  # classify: the k most confident images per class, not tau
    lrp_alpha: float = 1.0  # Model LEGO's alpha-beta relevance rule (classify); alpha-beta=1
    lrp_beta: float = 0.0


def _settings(
    opts: AttributeOptions,
    head: Head,
    task: str,
    layers: dict[str, str],
    pre: data.Preprocess,
    sha: str,
) -> dict[str, Any]:
    from onnxcut._version import __version__

    return {
        "model_sha256": sha,
        "task": task,
        "tau": opts.tau,
        "output": head.output,
        "score": head.score,
        "category_axis": head.axis,
        "probs": head.probs,
        "objective": opts.objective,
        "preprocess": pre.to_json(),
        "grad": opts.grad,
        "layers": list(layers),
        "features": list(layers.values()),
        "labels": bool(opts.masks) or (task == "classify" and opts.class_names is not None),
        "lrp": [opts.lrp_alpha, opts.lrp_beta] if task == "classify" else None,
        "top_k": opts.top_k,
        "onnxcut_version": __version__,
    }


def _run_info(model: str | os.PathLike[str], images: str | os.PathLike[str]) -> dict[str, Any]:
    """Facts of this run that shards of one run may differ in."""
    return {"model_path": str(Path(model).resolve()), "data_path": str(Path(images).resolve())}


def attribute(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    options: AttributeOptions | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Scores:
    """Score every probed layer's channels per category over the images under `images`.

    With `checkpoint`, partial sums are saved there every `checkpoint_every` images; with
    `resume`, a run picks up from that file. `progress(done, total)` is called per batch.
    """
    opts = options or AttributeOptions()
    if not 0 < opts.tau < 1:
        raise DataError(f"--tau {opts.tau}: use a probability between 0 and 1")
    proto = load(model, opts.input_shapes)
    # Images run one at a time through the backward graph, whose rules need static shapes.
    if default_batch_inplace(proto):
        infer_shapes(proto)
    head = find_head(proto, opts.output, opts.category_axis, opts.probs)
    task = opts.task if opts.task != "auto" else ("segment" if head.spatial else "classify")
    if task == "segment" and not head.spatial:
        raise ModelError(f"output '{head.output}' is not spatial (N, K, H, W); use --task classify")
    pre = data.preprocess_from(proto, opts.preprocess_file, opts.preprocess)
    pre = data.fit_to_model(pre, proto)
    layers = probe_layers(proto, opts.layers, head)
    sha = sha256(model)
    k, n = data.parse_shard(opts.shard)
    root = Path(images)
    paths = data.list_images(root)
    labels = _label_source(opts, task, root, head)
    if opts.top_k is not None and (task != "classify" or opts.top_k < 1):
        raise DataError("--top-k N (N >= 1) selects confident images of classifiers only")
    settings = _settings(opts, head, task, layers, pre, sha)
    categories = [str(i) for i in range(head.n_categories)]
    if opts.class_names is not None:
        if len(opts.class_names) != head.n_categories:
            raise DataError(
                f"--class-names lists {len(opts.class_names)} names, the model has "
                f"{head.n_categories} categories"
            )
        categories = list(opts.class_names)
    scores = Scores.empty(
        categories,
        channel_counts(proto, layers),
        ("forward", "backward", "taylor", *(["relevance"] if task == "classify" else [])),
        {
            **settings,
            **_run_info(model, images),
            "images": 0,
            "skipped": 0,
            "shard": opts.shard,
            "done": 0,
        },
    )
    if resume and checkpoint and Path(checkpoint).exists():
        scores = _resume(checkpoint, scores)
    route = Route(proto, head.score, opts.lrp_alpha, opts.lrp_beta) if task == "classify" else None
    extra = [*route.inputs, *route.outputs.values()] if route else []
    runner = GradientRunner(
        proto,
        head,
        layers,
        provider=opts.provider,
        threads=opts.threads,
        backend=opts.grad,
        extra=extra,
        objective=opts.objective,
    )
    chosen = None
    if opts.top_k:
        # Selected over all images before sharding, so shards of one run agree on the set.
        chosen = _top_k(runner, paths, labels, pre, head, opts.top_k)
        paths = sorted(chosen)
    paths = data.shard(paths, k, n)
    done = saved = int(scores.meta["done"])
    step = max(opts.batch, 1)
    skipped = data.Skipped(hold=scores.meta["images"] == 0)
    for start in range(done, len(paths), step):
        chunk = paths[start : start + step]
        for path in chunk:
            image = data.read_image(path, pre)
            if image is None:
                skipped.skip(path)
                scores.meta["skipped"] += 1
                continue
            skipped.read()
            x = data.to_input(image, pre)[None]
            if chosen is not None:
                _accumulate(scores, runner, x, head, task, 0.0, chosen[path], route)
            else:
                label = labels(path, image.shape[:2]) if labels else None
                _accumulate(scores, runner, x, head, task, opts.tau, label, route)
            scores.meta["images"] += 1
        scores.meta["done"] = start + len(chunk)
        if progress and scores.meta["images"]:  # none readable yet: the error stays alone
            progress(scores.meta["done"], len(paths))
        if checkpoint and scores.meta["done"] - saved >= opts.checkpoint_every:
            save_scores(scores, checkpoint)
            saved = scores.meta["done"]
    if scores.meta["images"] == 0:
        raise skipped.error(len(paths))
    return scores


def _top_k(
    runner: GradientRunner, paths: list[Path], labels, pre: data.Preprocess, head: Head, k: int
) -> dict[Path, int]:
    """The k most confident images of each class: {path: class}, by one forward pass each.

    The class is an image's label (ImageFolder) or else its prediction; confidence is the
    probability of that class. Ties go to the earlier path.
    """
    ranked: dict[int, list[tuple[float, int, Path]]] = {}
    for i, path in enumerate(paths):
        image = data.read_image(path, pre)
        if image is None:
            continue
        score, outputs, _ = runner.forward(data.to_input(image, pre)[None])
        probs = np.moveaxis(probabilities(score, head, outputs)[0], head.axis - 1, 0)
        label = labels(path, image.shape[:2]) if labels else None
        c = int(label) if label is not None else int(np.argmax(probs))
        ranked.setdefault(c, []).append((-float(probs[c]), i, path))
    return {path: c for c, items in ranked.items() for _, _, path in sorted(items)[:k]}


def _resume(checkpoint: str | os.PathLike[str], fresh: Scores) -> Scores:
    saved = load_scores(checkpoint)
    for key in sorted(fresh.meta.keys() - {"images", "skipped", "done", "model_path", "data_path"}):
        if saved.meta.get(key) != fresh.meta.get(key):
            raise DataError(
                f"{checkpoint}: checkpoint was made with another '{key}' "
                f"({saved.meta.get(key)!r}); delete it or rerun with those settings"
            )
    log.info("resuming after %d images", saved.meta["done"])
    return saved


def _label_source(opts: AttributeOptions, task: str, root: Path, head: Head):
    """Return label(path, (H, W)) -> label mask or class index, or None without labels."""
    if task == "segment":
        if not opts.masks:
            return None
        mask_dir = Path(opts.masks)
        if not mask_dir.is_dir():
            raise DataError(f"--masks {mask_dir}: not a folder")

        def segment_label(path: Path, size: tuple[int, int]) -> np.ndarray | None:
            found = data.mask_path(mask_dir, path, root)
            if found is None:
                log.warning("%s: no label mask in %s; confidence alone is used", path, mask_dir)
                return None
            return data.read_mask(found, size, head.n_categories)

        return segment_label
    folders = [p for p in root.iterdir() if p.is_dir()]
    if not folders:
        return None
    mapping = data.class_folders(root, opts.class_names)
    bad = [f for f, i in mapping.items() if i >= head.n_categories]
    if bad:
        raise DataError(
            f"class folder '{bad[0]}' maps to class {mapping[bad[0]]}, the model has "
            f"{head.n_categories}; check --class-names"
        )

    def class_label(path: Path, size: tuple[int, int]) -> int:
        return mapping[path.relative_to(root).parts[0]]

    return class_label


def _accumulate(
    scores: Scores,
    runner: GradientRunner,
    x: np.ndarray,
    head: Head,
    task: str,
    tau: float,
    label,
    route: Route | None = None,
) -> None:
    score, outputs, extras = runner.forward(x)
    probs = probabilities(score, head, outputs)[0]  # (K, H, W) or (K,)
    probs = np.moveaxis(probs, head.axis - 1, 0)
    if task == "segment":
        masks = probs > tau  # (K, H, W)
        if label is not None:
            label = resize_masks(label, masks.shape[1:])  # image size -> output size
            masks &= label[None] == np.arange(head.n_categories)[:, None, None]
        present = np.flatnonzero(masks.reshape(len(masks), -1).any(1))
    else:
        k = int(label) if label is not None else int(np.argmax(probs))
        present = np.array([k] if probs[k] >= tau else [], np.int64)
        masks = np.ones((head.n_categories, 1, 1), bool)
    if present.size == 0:
        return
    acts, grads = runner.gradients(x, present, masks[present])
    for name in runner.layers:
        axis = runner.axes[name]  # channels first: (C, h, w) or (C,), (P, C, h, w) or (P, C)
        f = np.moveaxis(acts[name][0], axis - 1, 0)
        g = np.moveaxis(grads[name], axis, 1)
        if f.ndim == 1:
            f, g = f[:, None, None], g[:, :, None, None]
        # Masked sums over pixels as float64 matrix products (BLAS, not einsum's loops).
        m = _resize(masks[present], f.shape[1:]).reshape(len(present), -1, 1).astype(np.float64)
        f = f.reshape(len(f), -1).astype(np.float64)  # (C, hw)
        g = g.reshape(*g.shape[:2], -1).astype(np.float64)  # (P, C, hw)
        # Magnitudes: a feature map that no ReLU follows (a residual branch before its Add)
        # carries signal in negative values too; after a ReLU this is the plain sum.
        fsum = (np.abs(f) @ m)[..., 0]  # (P, C)
        gsum = (np.maximum(g, 0) @ m)[..., 0]
        scores.arrays[f"forward/{name}"][present] += quantize(_normalise(fsum))
        scores.arrays[f"backward/{name}"][present] += quantize(_normalise(gsum))
        # First-order change of S_k when channel c is zeroed: |sum_M F_c dS_k/dF_c|.
        tsum = np.abs(((g * f) @ m)[..., 0])
        scores.arrays[f"taylor/{name}"][present] += quantize(_normalise(tsum))
    if route is not None:
        _add_relevance(scores, route, extras, present)
    scores.count[present] += 1


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
    if masks.shape[1:] == (1, 1):  # classifiers: the whole feature map
        return np.ones((len(masks), *size), bool)
    return resize_masks(masks, size)
