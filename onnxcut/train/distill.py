"""distill(): finish a sub-network against its original model, label-free, on the ONNX graph.

The teacher's category output is restricted to the student's categories (read from the
student's `onnxcut.categories` metadata), tempered and renormalised in the teacher's own
session; the student learns it with the KL loss of `losses`, per pixel for segmentation and
per image for classification. Label masks, where given, add a cross-entropy term.

Images are visited in a seeded order per epoch, so a run resumed from its checkpoint gives
the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from onnx import ModelProto, numpy_helper

from onnxcut import data
from onnxcut.attribution.agreement import agreement
from onnxcut.attribution.probe import (
    Head,
    find_head,
    resize_masks,
)
from onnxcut.errors import DataError, ModelError, TrainError
from onnxcut.graph.edit import set_metadata
from onnxcut.graph.io import load
from onnxcut.graph.shapes import dims, graph_inputs
from onnxcut.train.categories import DROPPED, CategoryMap, category_map, fold_into
from onnxcut.train.graph import WEIGHTS, build
from onnxcut.train.hints import match_hints
from onnxcut.train.losses import LABEL_SCALE, LABELS, TARGET
from onnxcut.train.optimizers import OPTIMIZERS, Optimizer
from onnxcut.train.params import trainable
from onnxcut.train.teacher import Teacher

log = logging.getLogger(__name__)

DISTILL_KEY = "onnxcut.distill"
Progress = Callable[[int, int, float], None]  # steps done, steps in all, running loss


@dataclass(frozen=True)
class DistillOptions:
    epochs: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    batch: int = 16
    temperature: float = 1.0
    warmup: float = 0.0  # share of the first epoch's steps over which lr rises to --lr
    seed: int = 0
    freeze: tuple[str, ...] = ()  # glob patterns over initializer and node names
    freeze_ops: tuple[str, ...] = ()
    masks: str | None = None  # label masks mixed in (segmentation)
    label_weight: float = 0.5
    val: str | None = None  # report agreement with the teacher after each epoch
    checkpoint_every: int = 50  # steps
    provider: str = "cpu"
    threads: int | None = None
    preprocess_file: str | None = None
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    input_shapes: Mapping[str, Sequence[int]] | None = None
    category_axis: int | None = None  # of the category output, student and teacher (default 1)
    hints: float = 0.0  # weight of the feature hints (0: output loss only)
    hints_at: tuple[str, ...] = ()  # globs over tensor names: hint only there (default: all)
    dropped: str = "renormalise"  # the teacher's dropped categories: renormalise or background

    def check(self) -> None:
        if not self.lr > 0:
            raise DataError(f"--lr {self.lr}: the learning rate must be above 0")
        if self.epochs < 1 or self.batch < 1 or self.checkpoint_every < 1:
            raise DataError("--epochs, --batch and the checkpoint interval must be at least 1")
        if not self.temperature > 0:
            raise DataError(f"--temperature {self.temperature}: must be above 0")
        if not 0 <= self.warmup <= 1:
            raise DataError(f"--warmup {self.warmup}: a share of the first epoch, 0 to 1")
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"optimizer '{self.optimizer}': use {', '.join(OPTIMIZERS)}")
        if not self.hints >= 0:
            raise DataError(f"--hints {self.hints}: a loss weight, 0 or above")
        if self.dropped not in DROPPED:
            raise DataError(f"--dropped {self.dropped}: use {' or '.join(DROPPED)}")
        if self.hints_at and not self.hints > 0:
            raise DataError("--hints-at chooses where hints go: give --hints a weight above 0")
        if not 0 <= self.label_weight <= 1:
            raise DataError(f"--label-weight {self.label_weight}: must lie in [0, 1]")


@dataclass
class EpochReport:
    epoch: int
    loss: float  # mean over the epoch's steps
    images: int
    agreement: float | None = None  # with the teacher on --val


def distill(
    student: str | os.PathLike[str] | ModelProto,
    teacher: str | os.PathLike[str] | ModelProto,
    images: str | os.PathLike[str],
    options: DistillOptions | None = None,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> ModelProto:
    """Train `student` to match `teacher` on the images under `images`; return the student
    with new weights and `onnxcut.distill` metadata."""
    opts = options or DistillOptions()
    opts.check()
    s = load(student, opts.input_shapes)
    t = load(teacher, opts.input_shapes)
    _check_inputs(s, t, student, teacher)
    head = find_head(s, axis=opts.category_axis)
    mapping = category_map(s, head, t, find_head(t, axis=opts.category_axis))
    pre = data.fit_to_model(data.preprocess_from(s, opts.preprocess_file, opts.preprocess), s)
    paths = data.list_images(images)
    masks = _mask_reader(opts, head, mapping, images) if opts.masks else None
    params = trainable(s, opts.freeze, opts.freeze_ops)
    if not params:
        raise ModelError(
            "every parameter is frozen (or none is a weight); drop some --freeze patterns"
        )
    steps_per_epoch = -(-len(paths) // opts.batch)
    warmup = round(opts.warmup * steps_per_epoch)
    optimizer = Optimizer(opts.optimizer, opts.lr, warmup=warmup)
    batch_size = min(opts.batch, len(paths))
    hints = match_hints(s, t, params, head.score, opts.hints_at) if opts.hints > 0 else {}
    kind = _loss_kind(s, head)
    graph = build(
        s,
        head.score,
        head.axis,
        params,
        kind=kind,
        temperature=opts.temperature,
        optimizer=optimizer,
        labels=masks is not None,
        batch=batch_size,
        hints=list(hints),
    )
    from onnxcut.train.trainer import Trainer  # imports onnxruntime

    initial = {i.name: numpy_helper.to_array(i) for i in s.graph.initializer if i.name in params}
    trainer = Trainer(graph, initial, optimizer, provider=opts.provider, threads=opts.threads)
    target = Teacher(
        t,
        mapping.positions,
        kind,
        opts.temperature,
        weight=1.0 - opts.label_weight if masks is not None else 1.0,
        provider=opts.provider,
        threads=opts.threads,
        category_axis=opts.category_axis,
        hints=hints,
        hint_weight=opts.hints,
        fold_into=fold_into(opts.dropped, kind, head, mapping),
    )
    ckpt = Path(checkpoint) if checkpoint is not None else None
    fingerprint = _fingerprint(s, t, opts, paths)
    start, meta = 0, {}
    if resume and ckpt is not None and ckpt.is_file():
        meta = trainer.restore(ckpt)
        if meta.get("fingerprint") != fingerprint:
            raise TrainError(
                f"{ckpt}: the checkpoint is from another student, teacher, data or options; "
                "delete it or drop --resume"
            )
        start = trainer.step_count
    total = steps_per_epoch * opts.epochs
    # A resumed run carries on the epoch reports and the current epoch's losses, so its
    # metadata and epoch lines are the uninterrupted run's too.
    reports = [EpochReport(**r) for r in meta.get("reports", [])]
    losses: list[float] = list(meta.get("epoch_losses", []))

    def state(epoch_losses: list[float], seen: int) -> dict[str, Any]:
        done = [dataclasses.asdict(r) for r in reports]
        return {
            "fingerprint": fingerprint,
            "reports": done,
            "epoch_losses": epoch_losses,
            "seen": seen,
        }

    step = start
    for epoch in range(start // steps_per_epoch, opts.epochs):
        mid_epoch = epoch == start // steps_per_epoch and start % steps_per_epoch
        epoch_losses = list(losses) if mid_epoch else []
        seen = int(meta.get("seen", 0)) if mid_epoch else 0
        skip = start - epoch * steps_per_epoch if epoch == start // steps_per_epoch else 0
        for batch in _epoch_batches(paths, pre, opts, epoch, skip):
            real = len(batch.paths)
            inputs, weights = _padded(batch.inputs, batch_size)
            feeds = {graph.data: inputs, WEIGHTS: weights, **target.feeds(inputs, real)}
            if masks is not None:
                feeds.update(masks(batch, feeds[TARGET]))
            try:
                loss = trainer.step(feeds)
            except TrainError as e:
                raise TrainError(f"{e} (epoch {epoch + 1}); {_kept(ckpt, trainer)}") from None
            step += 1
            seen += real
            epoch_losses.append(loss)
            if progress is not None:
                progress(step, total, float(np.mean(epoch_losses)))
            # The epoch's last step is saved below, with the epoch's report.
            if ckpt is not None and step % opts.checkpoint_every == 0 and step % steps_per_epoch:
                trainer.save(ckpt, state(epoch_losses, seen))
        losses = epoch_losses or losses
        report = EpochReport(epoch + 1, float(np.mean(epoch_losses or [np.nan])), seen)
        if opts.val:
            current = _with_weights(s, trainer.parameters())
            report.agreement = agreement(
                current,
                t,
                opts.val,
                mapping.categories,
                preprocess=pre,
                background=0 if head.spatial and 0 in mapping.categories else None,
                provider=opts.provider,
                threads=opts.threads,
                category_axis=opts.category_axis,
            )
        reports.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if ckpt is not None:
            trainer.save(ckpt, state(epoch_losses, seen))
    result = _with_weights(s, trainer.parameters())
    _record(result, opts, reports, len(paths), float(np.mean(losses)) if losses else None)
    return result


def _check_inputs(s: ModelProto, t: ModelProto, student, teacher) -> None:
    si, ti = graph_inputs(s), graph_inputs(t)
    if len(si) != 1 or len(ti) != 1:
        raise ModelError(
            f"distill needs one image input; the student has {len(si)}, the teacher {len(ti)}"
        )
    a, b = dims(si[0]) or [], dims(ti[0]) or []
    if len(a) != len(b) or any(x != y for x, y in zip(a[1:], b[1:], strict=False)):
        raise ModelError(
            f"the inputs differ: student '{si[0].name}' is {'x'.join(map(str, a))}, teacher "
            f"'{ti[0].name}' is {'x'.join(map(str, b))}; distill a student cut from the teacher"
        )
    sp = {p.key: p.value for p in s.metadata_props}.get(data.PREPROCESS_KEY)
    tp = {p.key: p.value for p in t.metadata_props}.get(data.PREPROCESS_KEY)
    if sp and tp and json.loads(sp) != json.loads(tp):
        raise ModelError(
            f"the student ({_name(student)}) and the teacher ({_name(teacher)}) record different "
            f"{data.PREPROCESS_KEY}; they must read images alike"
        )


def _name(model) -> str:
    return "an in-memory model" if isinstance(model, ModelProto) else str(model)


def _loss_kind(model: ModelProto, head: Head) -> str:
    producer = {o: n for n in model.graph.node for o in n.output}.get(head.output)
    sigmoid = producer is not None and producer.op_type == "Sigmoid"
    return (
        "sigmoid"
        if sigmoid or (head.score == head.output and head.n_categories == 1)
        else "softmax"
    )


def _padded(inputs: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad a short batch to the graph's static size by repeating its first image; the
    padding rows get weight 0."""
    weights = np.zeros(size, np.float32)
    weights[: len(inputs)] = 1.0
    if len(inputs) < size:
        inputs = np.concatenate([inputs, np.repeat(inputs[:1], size - len(inputs), axis=0)])
    return inputs, weights


def _epoch_batches(
    paths: Sequence[Path], pre: data.Preprocess, opts: DistillOptions, epoch: int, skip: int
) -> Iterator[data.Batch]:
    order = np.random.default_rng([opts.seed, epoch]).permutation(len(paths))
    ordered = [paths[i] for i in order[skip * opts.batch :]]
    yield from data.batches(ordered, pre, opts.batch)


def _kept(ckpt: Path | None, trainer) -> str:
    if ckpt is not None and ckpt.is_file():
        with np.load(ckpt, allow_pickle=False) as f:
            step = json.loads(str(f["meta"]))["step"]
        return f"the last good checkpoint is {ckpt} (step {step}); lower --lr and --resume"
    return "no checkpoint was written yet; lower --lr and run again"


def _fingerprint(s: ModelProto, t: ModelProto, opts: DistillOptions, paths) -> str:
    h = hashlib.sha256()
    for m in (s, t):
        h.update(hashlib.sha256(m.SerializeToString()).digest())
    fields = dataclasses.asdict(opts)
    for key in ("val", "checkpoint_every", "provider", "threads", "epochs"):
        fields.pop(key)
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    h.update("\n".join(map(str, paths)).encode())
    return h.hexdigest()


def _with_weights(model: ModelProto, weights: Mapping[str, np.ndarray]) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
    return out


def _record(model: ModelProto, opts, reports: list[EpochReport], images: int, loss) -> None:
    info = {
        "epochs": opts.epochs,
        "images": images,
        "batch": opts.batch,
        "lr": opts.lr,
        "warmup": opts.warmup,
        "optimizer": opts.optimizer,
        "temperature": opts.temperature,
        "hints": opts.hints,
        "hints_at": list(opts.hints_at),
        "dropped": opts.dropped,
        "labels": bool(opts.masks),
        "final_loss": loss,
        "agreement": [r.agreement for r in reports] if opts.val else None,
    }
    set_metadata(model, DISTILL_KEY, json.dumps(info))


def _mask_reader(opts: DistillOptions, head: Head, mapping: CategoryMap, images) -> Callable:
    """Return (batch, target) -> {labels, label_scale}: one-hot label maps over the student's
    outputs. Labels of categories the student dropped count as background (category 0)
    where it kept one, as in the category-customised task; 255 is unlabeled."""
    if not head.spatial:
        raise DataError("--masks needs a segmentation student; classifiers learn from the teacher")
    mask_dir, root = Path(opts.masks), Path(images)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: not a folder of label masks; check --masks")
    cats = mapping.categories
    lookup = np.full(256, cats.index(0) if 0 in cats else -1, np.int64)
    lookup[cats] = np.arange(len(cats))
    lookup[data.IGNORE_LABEL] = -1

    def read(batch: data.Batch, target: np.ndarray) -> dict[str, np.ndarray]:
        axis, k = head.axis, target.shape[head.axis]
        size = tuple(target.shape[2:] if axis == 1 else target.shape[1:3])
        labels = np.full((len(target), *size), -1, np.int64)  # padding rows: unlabeled
        for i, (path, shape) in enumerate(zip(batch.paths, batch.sizes, strict=True)):
            found = data.mask_path(mask_dir, path, root)
            if found is not None:
                label = data.read_mask(found, shape, mapping.labels)
                labels[i] = lookup[resize_masks(label, size)]
        onehot = (labels[..., None] == np.arange(k)).astype(np.float32)  # (N, h, w, K)
        if axis == 1:
            onehot = np.ascontiguousarray(onehot.transpose(0, 3, 1, 2))
        labelled = int((labels >= 0).sum())
        scale = opts.label_weight / labelled if labelled else 0.0
        return {LABELS: onehot, LABEL_SCALE: np.float32(scale)}

    return read
