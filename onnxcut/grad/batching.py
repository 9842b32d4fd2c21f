"""Whether K categories may share one backward batch.

Batched categories stack K copies of the forward batch along axis 0 of every gradient, and
rules broadcast forward factors over the copies. That is exact only where every node on the
backward path keeps axis 0 as the batch and never mixes values along it. A node that does
is named in a BatchError, and the session then runs categories one at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from onnx import NodeProto

from onnxcut.errors import BatchError
from onnxcut.graph.io import GraphIndex, attrs


def _axis_is_batch(default: int) -> Callable:
    def check(node: NodeProto, a: dict, index: GraphIndex) -> bool:
        rank = len(index.shape(node.input[0]) or [0])
        return rank > 0 and int(a.get("axis", default)) % rank == 0

    return check


def _listed_axes(node: NodeProto, a: dict, index: GraphIndex, position: int) -> list[int]:
    """Axes from the attribute (old opsets) or the constant input at `position`."""
    if "axes" in a:
        return [int(v) for v in a["axes"]]
    name = node.input[position] if len(node.input) > position else ""
    value = index.const(name) if name else None
    return [] if value is None else [int(v) for v in value.reshape(-1)]


def _reduces_batch(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    rank = len(index.shape(node.input[0]) or [0])
    axes = _listed_axes(node, a, index, 1)
    if not axes:  # no axes: everything, unless noop_with_empty_axes
        return not int(a.get("noop_with_empty_axes", 0))
    return any(ax % max(rank, 1) == 0 for ax in axes)


def _squeezes_batch(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    rank = len(index.shape(node.output[0] if node.op_type == "Unsqueeze" else node.input[0]) or [0])
    axes = _listed_axes(node, a, index, 1)
    return not axes or any(ax % max(rank, 1) == 0 for ax in axes)


def _pads_batch(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    pads = a.get("pads")
    if pads is None:
        value = index.const(node.input[1]) if len(node.input) > 1 else None
        if value is None:
            return True
        pads = value.reshape(-1)
    axes = _listed_axes(node, {}, index, 3) or list(range(len(pads) // 2))
    n = len(axes)
    return any(int(pads[k]) or int(pads[n + k]) for k, ax in enumerate(axes) if ax == 0)


def _slices_batch(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    if "starts" in a:  # opset < 10 keeps them as attributes
        starts, ends, axes = a["starts"], a["ends"], a.get("axes")
    else:
        starts, ends = (index.const(node.input[i]) for i in (1, 2))
        axes = index.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if starts is None or ends is None:
            return True
    axes = list(range(len(starts))) if axes is None else [int(v) for v in np.reshape(axes, -1)]
    size = (index.shape(node.input[0]) or [None])[0]
    for ax, start, end in zip(axes, np.reshape(starts, -1), np.reshape(ends, -1), strict=True):
        if ax == 0 and not (int(start) == 0 and isinstance(size, int) and int(end) >= size):
            return True
    return False


def _transposes_batch(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    perm = a.get("perm")
    return perm is None or int(perm[0]) != 0


def _transposes_a(node: NodeProto, a: dict, index: GraphIndex) -> bool:
    return bool(int(a.get("transA", 0)))


# op -> does the node act along axis 0 (mix or move values across samples)?
ACTS_ON_BATCH: dict[str, Callable[[NodeProto, dict, GraphIndex], bool]] = {
    "Concat": _axis_is_batch(0),
    "Split": _axis_is_batch(0),
    "Softmax": _axis_is_batch(-1),
    "LogSoftmax": _axis_is_batch(-1),
    "Flatten": _axis_is_batch(1),
    "Gather": _axis_is_batch(0),
    "LayerNormalization": _axis_is_batch(-1),
    "ReduceSum": _reduces_batch,
    "ReduceMean": _reduces_batch,
    "Squeeze": _squeezes_batch,
    "Unsqueeze": _squeezes_batch,
    "Pad": _pads_batch,
    "Slice": _slices_batch,
    "Transpose": _transposes_batch,
    "Gemm": _transposes_a,
}
# Ops whose second operand's rows are not the batch: a varying one is refused.
_ROWS_NOT_BATCH = {"Gemm", "MatMul"}


def check_batchable(node: NodeProto, index: GraphIndex, varying: set[str], batch) -> None:
    """Raise BatchError if K category copies cannot share this node's backward batch.

    `varying` holds the float tensors computed from graph inputs; `batch` is the forward
    batch size (an int or a dim name) of the differentiated output.
    """
    for name in (n for n in [*node.input, *node.output] if n in varying):
        shape = index.shape(name)
        if batch is None or not shape or shape[0] != batch:
            text = "x".join(map(str, shape)) if shape else "unknown"
            raise BatchError(
                f"node '{node.name}' ({node.op_type}): tensor '{name}' (shape {text}) does "
                "not keep the batch on axis 0; categories run one at a time"
            )
    if node.op_type in _ROWS_NOT_BATCH and len(node.input) > 1 and node.input[1] in varying:
        raise BatchError(
            f"node '{node.name}' ({node.op_type}): both operands vary with the input; "
            "categories run one at a time"
        )
    acts = ACTS_ON_BATCH.get(node.op_type)
    if acts is not None and acts(node, attrs(node), index):
        raise BatchError(
            f"node '{node.name}' ({node.op_type}) acts along the batch axis; "
            "categories run one at a time"
        )
