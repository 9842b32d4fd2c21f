"""Least-squares reconstruction: refit the layers that read removed channels, label-free.

After a cut, a Conv (group 1) or Gemm that lost input channels sees only the kept ones, and
every such layer below it sees changed inputs. On unlabeled images, each one's kept-channel
weights and bias are refit so that its output matches the original's: ridge least squares
of the original output on the cut model's inputs (in their kernel windows), one layer at a
time in graph order, each seeing the layers before it already refit (He et al. 2017 and
ThiNet do the same for pruned CNNs). No gradient, no labels. The result is a model of the
original's shape whose refit layers carry the new weights; `extract` of it with the same
plan cuts it exactly, as for any model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import ModelProto, helper, numpy_helper

from onnxcut import data
from onnxcut.attribution.compensation import in_by_out, readers_of, run_batches
from onnxcut.channels.plan import PlanLike, as_plan
from onnxcut.channels.surgery import mask
from onnxcut.errors import DataError
from onnxcut.grad.nn import conv_pads
from onnxcut.graph.edit import drop_unread_initializers
from onnxcut.graph.io import GraphIndex, load

log = logging.getLogger(__name__)

_PURPOSE = "to reconstruct on"
SAMPLES = 16384  # output positions per reader the fit uses (a seeded draw)
RIDGE = 1e-3  # ridge weight, relative to the mean of the normal matrix's diagonal
FLAT_ROUNDS = 5  # least-squares rounds that let targets past a ReLU's bound go


def reconstruct(
    model: ModelProto | str | os.PathLike[str],
    plan: PlanLike,
    images: str | os.PathLike[str],
    *,
    preprocess: data.Preprocess | None = None,
    limit: int | None = 64,
    provider: str = "cpu",
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    exclude: Collection[Path] = (),
) -> ModelProto:
    """The model with every reader of a removed channel refit on `images` (up to `limit`),
    leaving out the (resolved) paths in `exclude`: the images an agreement is measured on,
    which a refit would otherwise fit (a classifier's last layer exactly, on 64 images).

    Memory holds the sampled positions only (SAMPLES per reader), never a whole feature map
    over all images.
    """
    proto = load(model)
    plan = as_plan(plan)
    if plan.compensation:
        raise DataError("the plan has a compensation section; reconstruction refits biases too")
    # The cut model, masked once: a refit layer has zeros where its removed inputs were, so
    # its new weights go into the masked copy as they are, as mask would leave them.
    cut = mask(proto, plan)
    readers = readers_of(proto, cut)
    pre = preprocess or data.fit_to_model(data.preprocess_from(proto), proto)
    paths = [p for p in data.list_images(Path(images)) if p.resolve() not in exclude][:limit]
    if not paths:
        raise DataError(
            f"{images}: every image there is one the agreement is measured on (--data); "
            "give --reconstruct a folder with other images"
        )
    nodes = {n.name: n for n in proto.graph.node}
    order = _refittable(proto, readers)
    if not order:
        return proto
    draws = {name: _Draw(np.random.default_rng(i), len(paths)) for i, name in enumerate(order)}
    targets: dict[str, list[np.ndarray]] = {name: [] for name in order}
    # A Gemm after a global average pool with more inputs than there are images is fit per
    # position of the pooled map (see `_pooled_map`); every other layer on its own output.
    index = GraphIndex(proto)  # the original graph: the refits below change weights only
    pooled = {
        name: _pooled_map(index, nodes[name])
        if _features(index, nodes[name], readers) >= len(paths)
        else None
        for name in order
    }
    heads = {name: _gemm(index, nodes[name]) for name in order if pooled[name]}
    # A pooled Gemm is fit per position: an activation after it acts on the mean.
    flats = {name: None if pooled[name] else _flat_range(index, nodes[name]) for name in order}
    outputs = [pooled[name] or nodes[name].output[0] for name in order]
    for start, batch in run_batches(proto, outputs, paths, pre, provider, threads, _PURPOSE):
        for name, y in zip(order, batch, strict=True):
            n, r, c = draws[name].positions(start, len(y), y.shape[2:])
            sampled = y[n, :, r, c] if y.ndim == 4 else y[n]  # (samples, channels)
            if pooled[name]:
                sampled = heads[name](sampled)
            targets[name].append(sampled)  # (samples, outputs)
    cut_nodes = {n.name: n for n in cut.graph.node}
    weights = {t.name: t for t in proto.graph.initializer}  # the originals: shapes only
    for i, name in enumerate(order):
        node = nodes[name]
        removed = readers[name][2] if name in readers else np.zeros(0, np.int64)
        # The inputs as the cut model computes them, with the layers before this one refit.
        feats = []
        kernel = tuple(weights[node.input[1]].dims[2:])
        tap = pooled[name] or node.input[0]
        for start, (x,) in run_batches(cut, [tap], paths, pre, provider, threads, _PURPOSE):
            where = draws[name].positions(start, len(x))
            feats.append(_windows(node, x, removed, kernel, where))
        feats, target = np.concatenate(feats), np.concatenate(targets.pop(name))
        _refit(proto, node, feats, target, removed, flats[name])
        _copy_inputs(proto, node, cut, cut_nodes[name])
        if progress:
            progress(i + 1, len(order))
    drop_unread_initializers(proto)  # the readers' old weights
    log.info("reconstruction: %d readers refit on %d images", len(order), len(paths))
    return proto


def _refittable(proto: ModelProto, readers: dict) -> list[str]:
    """The readers of removed channels and every Conv (group 1) or Gemm below them, whose
    inputs the cut changes too, in graph order. Weights that Constant nodes or subgraphs
    compute stay as they are."""
    index = GraphIndex(proto)
    weights = {t.name for t in proto.graph.initializer}
    changed: set[str] = set()
    order = []
    for node in proto.graph.node:  # topological: a node after its inputs' producers
        below = node.name in readers or any(i in changed for i in node.input)
        if not below:
            continue
        changed.update(node.output)
        if len(node.input) > 1 and node.input[1] in weights and in_by_out(node, index) is not None:
            order.append(node.name)
    return order


class _Draw:
    """Seeded output positions per image, drawn when the output's size is first seen."""

    def __init__(self, rng: np.random.Generator, images: int):
        self.rng, self.per_image = rng, max(1, -(-SAMPLES // max(images, 1)))
        self.drawn: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def positions(self, start: int, count: int, size: tuple[int, ...] | None = None):
        """(image in batch, row, col) arrays for the `count` images from image `start`; the
        first call for a batch gives the output's spatial `size` and draws them."""
        if size is not None:
            cells = int(np.prod(size)) if size else 1
            for n in range(count):
                take = self.rng.choice(cells, min(self.per_image, cells), replace=False)
                self.drawn[start + n] = np.divmod(take, size[1]) if size else (take, take)
        images = range(start, start + count)
        n = np.concatenate([np.full(len(self.drawn[k][0]), k - start) for k in images])
        r = np.concatenate([self.drawn[k][0] for k in images])
        c = np.concatenate([self.drawn[k][1] for k in images])
        return n, r, c


def _windows(node, x: np.ndarray, removed, kernel, where) -> np.ndarray:
    """The kept inputs at the sampled positions: (samples, kept x kernel taps) windows of a
    Conv, or the kept input features of a Gemm."""
    n, r, c = where
    kept = np.setdiff1d(np.arange(x.shape[1]), removed)
    if node.op_type != "Conv":  # a Gemm's features, or the pooled map's at its positions
        return (x[n, :, r, c] if x.ndim == 4 else x[n])[:, kept].astype(np.float64)
    a = {v.name: helper.get_attribute_value(v) for v in node.attribute}
    if x.ndim != 4:
        raise DataError(f"reconstruction refits 2-D Convs; '{node.name}' is not one")
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    begins, ends = conv_pads(a, list(x.shape[2:]), list(kernel), strides, dilations)
    pads = [*begins, *ends]  # auto_pad (TFLite's SAME) resolved against the input size
    xp = np.pad(x[:, kept], ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = sliding_window_view(xp, span, axis=(2, 3))[
        :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
    ]
    return windows[n, :, r, c].reshape(len(n), -1).astype(np.float64)


# Ops between a global average pool and the Gemm that only drop its 1x1 spatial axes.
_FLATTENING = ("Flatten", "Reshape", "Squeeze")


def _pooled_map(index: GraphIndex, node) -> str | None:
    """The 4-D map a Gemm reads through GlobalAveragePool (or ReduceMean over both spatial
    axes) and a flatten, or None.

    Gemm(mean_p f_p) = mean_p Gemm(f_p), both linear: fitting the Gemm per position of that
    map, to the original Gemm of the original map's positions, gives height x width samples
    an image instead of one. (A ResNet-50 head has 2,048 inputs: 64 images would fit it
    exactly and generalise poorly.) It fits the positions rather than their mean, a
    stricter aim: with more images than inputs the pooled fit generalised better on the
    sample classifier (resnet_digits_cls at a quarter of the FLOPs, 5 digits, 64 images:
    top-1 kept 0.792 pooled, 0.732 per position; with 4 images 0.342 and 0.423).
    """
    if node.op_type != "Gemm" or any(a.name == "transA" and a.i for a in node.attribute):
        return None
    producer = index.producer.get(node.input[0])
    while producer is not None and producer.op_type in _FLATTENING:
        producer = index.producer.get(producer.input[0])
    if producer is None:
        return None
    source = producer.input[0]
    shape = index.shape(source)
    if shape is None or len(shape) != 4:
        return None
    if producer.op_type == "GlobalAveragePool":
        return source
    if producer.op_type == "ReduceMean":
        axes = index.const(producer.input[1]) if len(producer.input) > 1 else None
        if axes is None:
            axes = next((a.ints for a in producer.attribute if a.name == "axes"), None)
        if axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]:
            return source
    return None


# Activations that are flat past a bound: op -> (lo, hi) from the node (None: not flat).
_FLAT = {
    "Relu": lambda index, n: (0.0, np.inf),
    "Clip": lambda index, n: _clip_bounds(index, n),
    "HardSwish": lambda index, n: (-3.0, np.inf),  # x relu6(x + 3) / 6: 0 below -3 only
    "HardSigmoid": lambda index, n: _hard_sigmoid_bounds(n),
}


def _clip_bounds(index: GraphIndex, node) -> tuple[float, float] | None:
    lo = index.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    given = [
        len(node.input) > 1 and bool(node.input[1]),
        len(node.input) > 2 and bool(node.input[2]),
    ]
    if (given[0] and lo is None) or (given[1] and hi is None):
        return None  # a computed bound
    attrs = {a.name: a.f for a in node.attribute}  # opset < 11 keeps them as attributes
    low = float(lo) if lo is not None else attrs.get("min", -np.inf)
    high = float(hi) if hi is not None else attrs.get("max", np.inf)
    return (low, high)


def _hard_sigmoid_bounds(node) -> tuple[float, float] | None:
    """max(0, min(1, alpha x + beta)) is flat outside [-beta / alpha, (1 - beta) / alpha]."""
    attrs = {a.name: a.f for a in node.attribute}
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    if alpha <= 0:
        return None
    return (-beta / alpha, (1 - beta) / alpha)


def _through_batch_norm(index: GraphIndex, bn, bounds):
    """Bounds on a BatchNormalization's output (inference mode, constant statistics) as
    per-channel bounds on its input: z = s y + t, so z <= L is y <= (L - t) / s for s > 0
    and y >= (L - t) / s for s < 0."""
    values = [index.const(name) for name in bn.input[1:5]]
    if any(v is None for v in values) or any(
        a.name == "training_mode" and a.i for a in bn.attribute
    ):
        return None
    scale, shift, mean, var = (np.asarray(v, np.float64) for v in values)
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    s = scale / np.sqrt(var + eps)
    t = shift - mean * s
    if not np.all(s != 0):
        return None
    with np.errstate(invalid="ignore"):
        low, high = ((b - t) / s for b in bounds)  # +-inf stay infinite
    return np.where(s > 0, low, high), np.where(s > 0, high, low)


def _flat_range(index: GraphIndex, node):
    """(lo, hi), scalars or per output channel, when the layer's output feeds only a flat
    activation (ReLU, constant Clip, HardSwish, HardSigmoid), directly or through an
    inference-mode BatchNormalization that nothing else reads; None otherwise."""
    out, bn = node.output[0], None
    readers = index.consumers.get(out, [])
    if (
        len(readers) == 1
        and readers[0].op_type == "BatchNormalization"
        and out not in index.outputs
    ):
        bn, out = readers[0], readers[0].output[0]
        readers = index.consumers.get(out, [])
    if len(readers) != 1 or out in index.outputs or readers[0].op_type not in _FLAT:
        return None
    bounds = _FLAT[readers[0].op_type](index, readers[0])
    if bounds is None or bn is None:
        return bounds
    return _through_batch_norm(index, bn, bounds)


def _features(index: GraphIndex, node, readers: dict) -> int:
    """The inputs a layer keeps: the unknowns per output of its refit, bias aside."""
    removed = readers[node.name][2] if node.name in readers else ()
    return _inputs(node, index.shape(node.input[1])) - len(removed)


def _gemm(index: GraphIndex, node) -> Callable[[np.ndarray], np.ndarray]:
    """The original Gemm as a function of rows x (samples, inputs): alpha x B' + beta C."""
    a = {v.name: helper.get_attribute_value(v) for v in node.attribute}
    b = index.const(node.input[1]).astype(np.float64)
    b = float(a.get("alpha", 1.0)) * (b.T if a.get("transB") else b)
    c = index.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    c = 0.0 if c is None else float(a.get("beta", 1.0)) * c.astype(np.float64)
    return lambda x: x.astype(np.float64) @ b + c


def _refit(
    proto: ModelProto, node, feats: np.ndarray, target: np.ndarray, removed, flat=None
) -> None:
    """Ridge least squares of the original output on the kept inputs' windows.

    `flat` = (lo, hi): the layer feeds only a ReLU or Clip, which maps everything below lo to
    lo and above hi to hi. Where the original output lies there, any output past the same
    bound does as well, so those samples stop pulling the fit once it gets past the bound
    (a few rounds of least squares with those targets moved to the fit's own outputs: the
    normal matrix stays, only the right-hand side changes).
    """
    inits = {t.name: t for t in proto.graph.initializer}
    weight = numpy_helper.to_array(inits[node.input[1]])
    a = {v.name: helper.get_attribute_value(v) for v in node.attribute}
    kept = np.setdiff1d(np.arange(_inputs(node, weight.shape)), removed)
    target = target.astype(np.float64)
    design = np.concatenate([feats, np.ones((len(feats), 1))], axis=1)
    normal = design.T @ design
    normal += RIDGE * np.trace(normal) / len(normal) * np.eye(len(normal))
    inverse = np.linalg.inv(normal)
    solution = inverse @ (design.T @ target)  # (features + 1, outputs)
    if flat is not None:
        lo, hi = flat
        below, above = target <= lo, target >= hi
        for _ in range(FLAT_ROUNDS):
            fitted = design @ solution
            aim = target.copy()
            past = (below & (fitted < lo)) | (above & (fitted > hi))
            aim[past] = fitted[past]
            solution = inverse @ (design.T @ aim)
    new = np.zeros(weight.shape, np.float64)
    if node.op_type == "Conv":
        new[:, kept] = solution[:-1].T.reshape(weight.shape[0], len(kept), *weight.shape[2:])
        bias = solution[-1]
    else:  # Gemm: y = alpha * x @ B' + beta * C
        fitted = solution[:-1] / float(a.get("alpha", 1.0))  # (kept inputs, outputs)
        if int(a.get("transB", 0)):
            new[:, kept] = fitted.T
        else:
            new[kept] = fitted
        bias = solution[-1] / float(a.get("beta", 1.0))
    _replace(proto, node, 1, new.astype(weight.dtype), inits)
    old_bias = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    shape = tuple(old_bias.dims) if old_bias is not None else bias.shape
    _replace(proto, node, 2, bias.reshape(shape).astype(weight.dtype), inits)


def _inputs(node, shape) -> int:
    """Input channels (Conv) or features (Gemm) of a weight of `shape`."""
    if node.op_type == "Conv":
        return shape[1]
    transposed = any(a.name == "transB" and a.i for a in node.attribute)
    return shape[1] if transposed else shape[0]


def _copy_inputs(source: ModelProto, node, target: ModelProto, twin) -> None:
    """Point `twin` (the node in `target`) at copies of `node`'s refit weight and bias."""
    inits = {t.name: t for t in source.graph.initializer}
    taken = {t.name: t for t in target.graph.initializer}
    for position in (1, 2):
        _replace(target, twin, position, numpy_helper.to_array(inits[node.input[position]]), taken)


def _replace(proto: ModelProto, node, position: int, value: np.ndarray, inits) -> None:
    """Give `node` a fresh initializer at input `position` (others may share the old one)."""
    name = f"{node.name}_reconstructed_{position}"
    while name in inits:
        name += "_"
    proto.graph.initializer.append(numpy_helper.from_array(value, name))
    inits[name] = proto.graph.initializer[-1]
    while len(node.input) <= position:
        node.input.append("")
    node.input[position] = name
