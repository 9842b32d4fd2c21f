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
Images run `batch` at a time through one forward and one backward call; slot p of image n
holds its p-th present category. onnxruntime computes each image of a batch on its own, and
each image's vectors are quantised and added to per-category sums, so memory grows with the
batch only, and shards, resumed runs, single runs and batch sizes agree bit for bit.
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
from onnxcut.attribution.accumulate import accumulate, groups, stack
from onnxcut.attribution.gradient_runner import GradientRunner
from onnxcut.attribution.probe import (
    Head,
    channel_counts,
    find_head,
    probabilities,
    probe_layers,
)
from onnxcut.attribution.relevance import Route
from onnxcut.attribution.scores import Scores, load_scores, save_scores
from onnxcut.errors import DataError, ModelError
from onnxcut.graph.io import load, sha256
from onnxcut.graph.shapes import default_batch_inplace, graph_inputs, infer_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttributeOptions:
    task: str = "auto"  # auto, segment or classify
    tau: float = 0.9
    output: str | None = None
    category_axis: int | None = None
    probs: str | None = None
    layers: tuple[str, ...] | None = None
    batch: int = 8  # images per forward/backward call, and per progress step
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


@dataclass
class Prepared:
    """What one attribute run sets up before its first image: built once per process."""

    proto: Any
    head: Head
    task: str
    pre: data.Preprocess
    layers: dict[str, str]
    settings: dict[str, Any]
    categories: list[str]
    runner: GradientRunner
    route: Route | None
    size: int  # images per forward/backward call
    labels: Any  # label(path, size) or None
    paths: list[Path]  # every image, before sharding


def prepare(
    model: str | os.PathLike[str], images: str | os.PathLike[str], opts: AttributeOptions
) -> Prepared:
    """Check the options, load the model and build its gradient sessions (shard not used)."""
    if not 0 < opts.tau < 1:
        raise DataError(f"--tau {opts.tau}: use a probability between 0 and 1")
    if opts.batch < 1:
        raise DataError(f"--batch {opts.batch}: use 1 or more images per call")
    proto = load(model, opts.input_shapes)
    # The backward graph's rules need static shapes: a dynamic batch becomes --batch; a
    # fixed one is kept. onnxruntime-training differentiates one image at a time.
    if default_batch_inplace(proto, opts.batch if opts.grad == "symbolic" else 1):
        infer_shapes(proto)
    head = find_head(proto, opts.output, opts.category_axis, opts.probs)
    task = opts.task if opts.task != "auto" else ("segment" if head.spatial else "classify")
    if task == "segment" and not head.spatial:
        raise ModelError(f"output '{head.output}' is not spatial (N, K, H, W); use --task classify")
    pre = data.fit_to_model(
        data.preprocess_from(proto, opts.preprocess_file, opts.preprocess), proto
    )
    layers = probe_layers(proto, opts.layers, head)
    data.parse_shard(opts.shard)
    root = Path(images)
    paths = data.list_images(root)
    labels = _label_source(opts, task, root, head)
    if opts.top_k is not None and (task != "classify" or opts.top_k < 1):
        raise DataError("--top-k N (N >= 1) selects confident images of classifiers only")
    categories = [str(i) for i in range(head.n_categories)]
    if opts.class_names is not None:
        if len(opts.class_names) != head.n_categories:
            raise DataError(
                f"--class-names lists {len(opts.class_names)} names, the model has "
                f"{head.n_categories} categories"
            )
        categories = list(opts.class_names)
    route = Route(proto, head.score, opts.lrp_alpha, opts.lrp_beta) if task == "classify" else None
    runner = GradientRunner(
        proto,
        head,
        layers,
        provider=opts.provider,
        threads=opts.threads,
        backend=opts.grad,
        extra=[*route.inputs, *route.outputs.values()] if route else [],
        objective=opts.objective,
    )
    return Prepared(
        proto,
        head,
        task,
        pre,
        layers,
        _settings(opts, head, task, layers, pre, sha256(model)),
        categories,
        runner,
        route,
        int(graph_inputs(proto)[0].type.tensor_type.shape.dim[0].dim_value or 1),
        labels,
        paths,
    )


def attribute(
    model: str | os.PathLike[str],
    images: str | os.PathLike[str],
    options: AttributeOptions | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Callable[[int, int], None] | None = None,
    prepared: Prepared | None = None,
) -> Scores:
    """Score every probed layer's channels per category over the images under `images`.

    With `checkpoint`, partial sums are saved there every `checkpoint_every` images; with
    `resume`, a run picks up from that file. `progress(done, total)` is called per batch.
    `prepared` (from `prepare` with the same model, images and options) skips the set-up.
    """
    opts = options or AttributeOptions()
    run = prepared or prepare(model, images, opts)
    head, task, pre, size = run.head, run.task, run.pre, run.size
    k, n = data.parse_shard(opts.shard)
    scores = Scores.empty(
        run.categories,
        channel_counts(run.proto, run.layers),
        ("forward", "backward", "taylor", *(["relevance"] if task == "classify" else [])),
        {
            **run.settings,
            **_run_info(model, images),
            "images": 0,
            "skipped": 0,
            "shard": opts.shard,
            "done": 0,
        },
    )
    if resume and checkpoint and Path(checkpoint).exists():
        scores = _resume(checkpoint, scores)
    paths, chosen = run.paths, None
    if opts.top_k:
        # Selected over all images before sharding, so shards of one run agree on the set.
        chosen = _top_k(run.runner, paths, run.labels, pre, head, opts.top_k, size)
        paths = sorted(chosen)
    paths = data.shard(paths, k, n)
    done = saved = int(scores.meta["done"])
    step = max(opts.batch, size)
    skipped = data.Skipped(hold=scores.meta["images"] == 0)
    for start in range(done, len(paths), step):
        chunk = paths[start : start + step]
        items = []  # (input, tau, label) of the readable images
        for path in chunk:
            image = data.read_image(path, pre)
            if image is None:
                skipped.skip(path)
                scores.meta["skipped"] += 1
                continue
            skipped.read()
            if chosen is not None:
                label, tau = chosen[path], 0.0
            else:
                label = run.labels(path, image.shape[:2]) if run.labels else None
                tau = opts.tau
            items.append((data.to_input(image, pre), tau, label))
        for group in groups(items, size):
            accumulate(scores, run.runner, group, size, head, task, run.route)
        scores.meta["images"] += len(items)
        scores.meta["done"] = start + len(chunk)
        if progress and scores.meta["images"]:  # none readable yet: the error stays alone
            progress(scores.meta["done"], len(paths))
        if checkpoint and scores.meta["done"] - saved >= opts.checkpoint_every:
            save_scores(scores, checkpoint)
            saved = scores.meta["done"]
    # A shard can be empty (--top-k selected fewer images than there are shards): it adds
    # nothing to the merge. Images that were there but none readable are an error.
    if scores.meta["images"] == 0 and paths:
        raise skipped.error(len(paths))
    return scores


def _top_k(
    runner: GradientRunner,
    paths: list[Path],
    labels,
    pre: data.Preprocess,
    head: Head,
    k: int,
    size: int,
) -> dict[Path, int]:
    """The k most confident images of each class: {path: class}, by one forward pass each.

    The class is an image's label (ImageFolder) or else its prediction; confidence is the
    probability of that class. Ties go to the earlier path.
    """
    read = []  # (order, path, input, label)
    for i, path in enumerate(paths):
        image = data.read_image(path, pre)
        if image is not None:
            label = labels(path, image.shape[:2]) if labels else None
            read.append((i, path, data.to_input(image, pre), label))
    ranked: dict[int, list[tuple[float, int, Path]]] = {}
    for group in groups(read, size):
        score, outputs, _ = runner.forward(stack([x for _, _, x, _ in group], size))
        probs = np.moveaxis(probabilities(score, head, outputs), head.axis, 1)
        for (i, path, _, label), p in zip(group, probs, strict=False):
            c = int(label) if label is not None else int(np.argmax(p))
            ranked.setdefault(c, []).append((-float(p[c]), i, path))
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
