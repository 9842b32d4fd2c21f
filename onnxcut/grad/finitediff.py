"""Finite-difference backend: per-channel signed gradient sums, by perturbing whole channels.

For each requested tensor T, T is computed once; then only the part of the graph after T
runs, on a batch holding, for each channel c, T + eps * e_c and T - eps * e_c. The central
difference of the objective is the sum over the channel of dS/dT. Signed sums only: the
positive part of the gradient cannot be read off a sum. Slow (2C runs of the tail per T)
and approximate near ReLU kinks; meant as a fallback for ops without a VJP rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import ModelProto, TensorProto, helper

from onnxcut.errors import DataError, ModelError, first_line
from onnxcut.graph.io import GraphIndex
from onnxcut.runtime import session

# Copies of the forward batch per tail run; bounds memory.
_CHUNK = 32


def channel_sums(
    model: ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    output: str,
    category: int,
    axis: int,
    mask: np.ndarray | None,
    rel_eps: float = 1e-3,
) -> dict[str, np.ndarray]:
    """Return {T: (N, C) sums over each channel of dS/dT} by central differences."""
    index = GraphIndex(model)
    for name in [output, *wrt]:
        if name not in index.producer and name not in index.inputs:
            raise ModelError(f"tensor '{name}' is not in the graph; pass a node output name")
    tails = {name: _tail(index, name, output) for name in wrt}
    needed = sorted({name for _, side in tails.values() for name in side} | set(wrt))
    full = _with_outputs(model, needed)
    values = dict(zip(needed, session(full).run(needed, dict(feeds)), strict=True))
    return {
        name: _differences(tails[name][0], name, values, output, category, axis, mask, rel_eps)
        for name in wrt
    }


def _tail(index: GraphIndex, start: str, output: str) -> tuple[ModelProto, list[str]]:
    """The subgraph from `start` to `output`, and the other tensors it reads."""
    after = {start}
    for node in index.graph.node:
        if any(i in after for i in node.input):
            after.update(node.output)
    if output not in after:
        raise ModelError(f"tensor '{start}' does not lead to output '{output}'")
    before = {output}
    nodes = []
    for node in reversed(index.graph.node):
        if any(o in before for o in node.output) and any(i in after for i in node.input):
            nodes.append(node)
            before.update(node.input)
    nodes.reverse()
    produced = {o for n in nodes for o in n.output}
    reads = {i for n in nodes for i in n.input if i and i not in produced}
    side = sorted(reads - set(index.initializers) - {start})
    inputs = [_dynamic_batch(index, name) for name in [start, *side]]
    graph = helper.make_graph(
        nodes,
        "tail",
        inputs,
        [helper.make_tensor_value_info(output, index.dtype(output) or TensorProto.FLOAT, None)],
        [index.initializers[i] for i in sorted(reads & set(index.initializers))],
    )
    tail = helper.make_model(graph, opset_imports=list(index.model.opset_import))
    tail.ir_version = index.model.ir_version
    return tail, side


def _dynamic_batch(index: GraphIndex, name: str):
    dims = index.shape(name)
    shape = None if dims is None else ["batch", *dims[1:]]
    return helper.make_tensor_value_info(name, index.dtype(name) or TensorProto.FLOAT, shape)


def _with_outputs(model: ModelProto, names: Sequence[str]) -> ModelProto:
    out = ModelProto()
    out.CopyFrom(model)
    index = GraphIndex(out)
    del out.graph.output[:]
    out.graph.output.extend(
        helper.make_tensor_value_info(n, index.dtype(n) or TensorProto.FLOAT, None) for n in names
    )
    return out


def _differences(tail, name, values, output, category, axis, mask, rel_eps) -> np.ndarray:
    base = values[name]  # (N, C, ...)
    n, channels = base.shape[:2]
    eps = rel_eps * max(float(np.sqrt(np.mean(base.astype(np.float64) ** 2))), 1e-3)
    sess = session(tail)
    side = [i.name for i in tail.graph.input][1:]
    scores = []  # per copy: (N,) objective
    copies = [(c, sign) for c in range(channels) for sign in (1.0, -1.0)]
    for start in range(0, len(copies), _CHUNK):
        chunk = copies[start : start + _CHUNK]
        batch = np.concatenate([base] * len(chunk)).astype(base.dtype)
        for k, (c, sign) in enumerate(chunk):
            batch[k * n : (k + 1) * n, c] += sign * eps
        feeds = {name: batch, **{s: np.concatenate([values[s]] * len(chunk)) for s in side}}
        try:
            (y,) = sess.run([output], feeds)
        except Exception as e:  # onnxruntime's own error types
            raise ModelError(
                f"the graph after '{name}' does not run on a batch of perturbed copies "
                f"({first_line(e)}); it must keep the batch on axis 0"
            ) from None
        scores.extend(_objective(y.reshape(len(chunk), n, *y.shape[1:]), category, axis, mask))
    s = np.asarray(scores, np.float64).reshape(channels, 2, n)
    return ((s[:, 0] - s[:, 1]) / (2 * eps)).T  # (N, C)


def _objective(y: np.ndarray, category: int, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """S per copy and image, from outputs stacked as (copies, N, ...)."""
    axis = axis % (y.ndim - 1) + 1
    if not 0 <= category < y.shape[axis]:
        raise DataError(
            f"category {category} is out of range: the output has {y.shape[axis]} categories"
        )
    taken = np.take(y, category, axis=axis).astype(np.float64)  # (copies, N, ...)
    if mask is not None:
        try:
            taken = taken * np.asarray(mask, np.float64)
        except ValueError:
            raise DataError(
                f"mask of shape {np.shape(mask)} does not broadcast against {taken.shape[1:]}"
            ) from None
    return taken.reshape(*taken.shape[:2], -1).sum(axis=2)
