"""Bias compensation for a plan: the mean of every removed channel, folded into its readers.

A Conv (group 1) or Gemm that loses input channel c no longer adds W[o, c] * x_c; replacing
x_c by its mean over images turns that into a constant, sum(W[o, c, ...]) * mean_c, which
the reader's bias can carry. That keeps every output's mean where the original had it
(exactly where the Conv's window lies inside the image; zero padding at the borders makes
the constant smaller there). The means come from the original model on unlabeled images;
the deltas go into the plan's `compensation` section, which `extract` and `mask` apply alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
from onnx import ModelProto, helper

from onnxcut import data
from onnxcut.channels.plan import Plan, PlanLike, as_plan
from onnxcut.channels.surgery import mask
from onnxcut.errors import DataError
from onnxcut.graph.io import GraphIndex, expose_tensors, load
from onnxcut.runtime import session

log = logging.getLogger(__name__)


def compensate(
    model: ModelProto | str | os.PathLike[str],
    plan: PlanLike,
    images: str | os.PathLike[str],
    *,
    preprocess: data.Preprocess | None = None,
    limit: int | None = 256,
    provider: str = "cpu",
    threads: int | None = None,
) -> Plan:
    """The plan with bias deltas for every reader of a removed channel, from `images`."""
    proto = load(model)
    plan = dataclasses.replace(as_plan(plan), compensation={})
    readers = readers_of(proto, mask(proto, plan))
    if not readers:
        return plan
    pre = preprocess or data.fit_to_model(data.preprocess_from(proto), proto)
    tensors = sorted({x for x, _, _ in readers.values()})
    means = _means(proto, tensors, images, pre, limit, provider, threads)
    deltas = {}
    for name, (x, weight, removed) in readers.items():
        deltas[name] = tuple(float(v) for v in weight[:, removed] @ means[x][removed])
    log.info("compensation: %d readers of removed channels", len(deltas))
    return dataclasses.replace(plan, compensation=deltas)


def readers_of(original: ModelProto, masked: ModelProto) -> dict[str, tuple]:
    """{node: (input tensor, (out, in) weight sums, removed input channels)} of the Conv
    (group 1) and Gemm nodes whose weights `mask` zeroed for some input channels."""
    before, after = GraphIndex(original), GraphIndex(masked)
    initializers = {t.name for t in original.graph.initializer}
    found = {}
    for node in original.graph.node:
        weights = in_by_out(node, before)
        bias = node.input[2] if len(node.input) > 2 else ""
        if weights is None or (bias and bias not in initializers):
            continue  # a bias computed in the graph cannot take the delta
        zeroed = in_by_out(after.nodes.get(node.name), after)
        if zeroed is None:
            continue
        removed = np.flatnonzero(~zeroed.any(axis=0) & weights.any(axis=0))
        if removed.size:
            found[node.name] = (node.input[0], weights, removed)
    return found


def in_by_out(node, index: GraphIndex) -> np.ndarray | None:
    """A reader's weights as (outputs, inputs), summed over the kernel window, or None."""
    if node is None or node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
        return None
    w = index.const(node.input[1])
    if w is None or not np.issubdtype(w.dtype, np.floating):
        return None
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    w = w.astype(np.float64)
    if node.op_type == "Conv":
        if int(a.get("group", 1)) != 1 or w.ndim < 3:
            return None
        return w.reshape(*w.shape[:2], -1).sum(axis=2)
    if int(a.get("transA", 0)) or w.ndim != 2:
        return None
    return (w if int(a.get("transB", 0)) else w.T) * float(a.get("alpha", 1.0))


def _means(model, tensors, images, pre, limit, provider, threads) -> dict[str, np.ndarray]:
    """Per-channel means (axis 1) of `tensors` over the images, in float64."""
    paths = data.list_images(Path(images))[:limit]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    purpose = "to measure the removed channels' means on"
    batches = run_batches(model, tensors, paths, pre, provider, threads, purpose, source=images)
    for _, values in batches:
        for t, v in zip(tensors, values, strict=True):
            axes = tuple(i for i in range(v.ndim) if i != 1)
            sums[t] = sums.get(t, 0) + v.astype(np.float64).sum(axis=axes)
            counts[t] = counts.get(t, 0) + v.size // v.shape[1]
    return {t: sums[t] / counts[t] for t in tensors}


BATCH = 8  # images per run; a model exported with a fixed batch uses its own


def run_batches(model, tensors, paths, pre, provider, threads, purpose: str, source=None):
    """Yield (index of the batch's first image, [values of `tensors`]) over the images.

    A short last batch is left out where the export fixes the batch size; when no batch
    could run, a DataError says what the images were for (`purpose`) and where (`source`).
    """
    sess = session(expose_tensors(model, tensors), provider, threads)
    name = sess.get_inputs()[0].name
    fixed = sess.get_inputs()[0].shape[0]
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None
    size = fixed or BATCH
    start = 0
    for batch in data.batches(paths, pre, size):
        if fixed and len(batch.inputs) < size:
            continue  # does not fit the fixed batch; the others suffice
        yield start, sess.run(tensors, {name: batch.inputs})
        start += len(batch.inputs)
    if start == 0:
        where = f"{source}: " if source is not None else ""
        raise DataError(f"{where}no batch of {size} readable images {purpose}; add images")
