"""Least-squares reconstruction: refit the layers that read removed channels, label-free.

After a cut, a Conv (group 1) or Gemm that lost input channels sees only the kept ones. On
unlabeled images, its kept-channel weights and bias are refit so that its output matches the
original's: ridge least squares of the original output on the cut model's inputs (in their
kernel windows), one reader at a time in graph order, each seeing the readers before it
already refit (He et al. 2017 and ThiNet do the same for pruned CNNs). No gradient, no
labels. The result is a model of the original's shape whose readers carry the new weights;
`extract` of it with the same plan cuts it exactly, as for any model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from onnx import ModelProto, helper, numpy_helper

from onnxcut import data
from onnxcut.attribution.compensation import readers_of
from onnxcut.channels.compensation import inputs_read
from onnxcut.channels.plan import PlanLike, as_plan
from onnxcut.channels.surgery import mask
from onnxcut.errors import DataError
from onnxcut.graph.io import expose_tensors, load
from onnxcut.runtime import session

log = logging.getLogger(__name__)

SAMPLES = 16384  # output positions per reader the fit uses (a seeded draw)
RIDGE = 1e-3  # ridge weight, relative to the mean of the normal matrix's diagonal


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
) -> ModelProto:
    """The model with every reader of a removed channel refit on `images` (up to `limit`)."""
    proto = load(model)
    plan = as_plan(plan)
    if plan.compensation:
        raise DataError("the plan has a compensation section; reconstruction refits biases too")
    readers = readers_of(proto, mask(proto, plan))
    pre = preprocess or data.fit_to_model(data.preprocess_from(proto), proto)
    paths = data.list_images(Path(images))[:limit]
    nodes = {n.name: n for n in proto.graph.node}
    weights = {t.name for t in proto.graph.initializer}
    # Weights that Constant nodes or subgraphs compute stay as they are.
    order = [n.name for n in proto.graph.node if n.name in readers and n.input[1] in weights]
    targets = _run(proto, [nodes[r].output[0] for r in order], paths, pre, provider, threads)
    rng = np.random.default_rng(0)
    for i, name in enumerate(order):
        node, removed = nodes[name], readers[name][2]
        # The inputs as the cut model computes them, with the readers before this one refit.
        (x,) = _run(mask(proto, plan), [node.input[0]], paths, pre, provider, threads).values()
        _refit(proto, node, x, targets[node.output[0]], removed, rng)
        if progress:
            progress(i + 1, len(order))
    _drop_unread(proto)
    log.info("reconstruction: %d readers refit on %d images", len(order), len(paths))
    return proto


def _drop_unread(proto: ModelProto) -> None:
    """Remove initializers that no node reads any more (the readers' old weights)."""
    read = set(inputs_read(proto.graph))
    read |= {v.name for v in [*proto.graph.input, *proto.graph.output]}
    keep = [t for t in proto.graph.initializer if t.name in read]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def _run(model, tensors, paths, pre, provider, threads) -> dict[str, np.ndarray]:
    sess = session(expose_tensors(model, tensors), provider, threads)
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    size = fixed if isinstance(fixed, int) and fixed > 0 else 8
    out: dict[str, list] = {t: [] for t in tensors}
    for batch in data.batches(paths, pre, size):
        if len(batch.inputs) < size and isinstance(fixed, int) and fixed > 0:
            continue  # a short last batch does not fit a fixed batch
        for t, v in zip(tensors, sess.run(tensors, {name: batch.inputs}), strict=True):
            out[t].append(v)
    if not out[tensors[0]]:
        raise DataError(f"no batch of {size} readable images to reconstruct on; add images")
    return {t: np.concatenate(v) for t, v in out.items()}


def _refit(proto: ModelProto, node, x: np.ndarray, y: np.ndarray, removed, rng) -> None:
    """Ridge least squares of `y` (the original output) on the kept inputs' windows."""
    inits = {t.name: t for t in proto.graph.initializer}
    weight = numpy_helper.to_array(inits[node.input[1]])
    a = {v.name: helper.get_attribute_value(v) for v in node.attribute}
    kept = np.setdiff1d(np.arange(x.shape[1]), removed)
    if node.op_type == "Conv":
        feats, target = _conv_samples(x, y, weight.shape[2:], a, kept, rng)
    else:  # Gemm: y = alpha * x @ B' + beta * C; fit alpha * B' and beta * C
        feats, target = x[:, kept].astype(np.float64), y.astype(np.float64)
    design = np.concatenate([feats, np.ones((len(feats), 1))], axis=1)
    normal = design.T @ design
    normal += RIDGE * np.trace(normal) / len(normal) * np.eye(len(normal))
    solution = np.linalg.solve(normal, design.T @ target)  # (features + 1, outputs)
    new = np.zeros(weight.shape, np.float64)
    if node.op_type == "Conv":
        new[:, kept] = solution[:-1].T.reshape(weight.shape[0], len(kept), *weight.shape[2:])
        bias = solution[-1]
    else:
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


def _conv_samples(x, y, kernel, a, kept, rng) -> tuple[np.ndarray, np.ndarray]:
    """(samples, kept * kernel taps) input windows and (samples, outputs) targets."""
    pads = list(a.get("pads", [0] * 4))
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    if len(kernel) != 2 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise DataError("reconstruction refits 2-D Convs with explicit pads only")
    xp = np.pad(x[:, kept], ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    windows = sliding_window_view(xp, span, axis=(2, 3))[
        :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
    ]
    n = len(windows)
    h, w = min(windows.shape[2], y.shape[2]), min(windows.shape[3], y.shape[3])
    take = rng.choice(n * h * w, min(SAMPLES, n * h * w), replace=False)
    i, rest = np.divmod(take, h * w)
    r, c = np.divmod(rest, w)
    feats = windows[i, :, r, c].reshape(len(take), -1).astype(np.float64)
    return feats, y[i, :, r, c].astype(np.float64)


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
