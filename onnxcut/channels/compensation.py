"""A plan's `compensation` section: bias deltas added to Conv and Gemm nodes before a cut.

A removed input channel c of a consumer with weights W contributes, on average, the sum of
W[o, c, ...] times the channel's mean value; adding that to the consumer's bias keeps each
output's mean where it was (`attribution.compensation` measures the means). The deltas go
into the model before the channels are traced, so `extract` slices them like any bias and
`mask` keeps them: the two stay equal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from onnxcut.errors import PlanError
from onnxcut.graph.edit import drop_unread_initializers, inputs_read

_OPS = ("Conv", "Gemm")


def add_bias_deltas(model: ModelProto, deltas: Mapping[str, Sequence[float]]) -> None:
    """Add each named node's deltas (one per output channel) to its bias, in place."""
    if not deltas:
        return
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for i in inputs_read(model.graph):
        readers[i] = readers.get(i, 0) + 1
    for name, values in deltas.items():
        node = nodes.get(name)
        if node is None or node.op_type not in _OPS:
            raise PlanError(
                f"compensation names '{name}', which is not a Conv or Gemm node of the model; "
                "make the plan for this model"
            )
        delta = np.asarray(values, np.float64) / _bias_scale(node)
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and bias not in inits:
            raise PlanError(
                f"compensation: node '{name}' ({node.op_type}) computes its bias in the graph; "
                "drop its entry from the plan"
            )
        old = numpy_helper.to_array(inits[bias]) if bias else None
        size = _outputs(node, inits)
        if len(delta) != size or (old is not None and old.size != size):
            raise PlanError(
                f"compensation['{name}'] has {len(delta)} values for {size} output channels; "
                "make the plan for this model"
            )
        dtype = old.dtype if old is not None else numpy_helper.to_array(inits[node.input[1]]).dtype
        base = old.reshape(-1).astype(np.float64) if old is not None else np.zeros(size)
        value = (base + delta).astype(dtype).reshape(old.shape if old is not None else (size,))
        new = _fresh(f"{name}_compensated_bias", inits)
        model.graph.initializer.append(numpy_helper.from_array(value, new))
        inits[new] = model.graph.initializer[-1]
        if bias:  # a shared bias stays as it was for its other readers
            readers[bias] -= 1
            node.input[2] = new
        else:
            node.input.extend([""] * (2 - len(node.input)) + [new])
    # Old biases no node reads any more.
    drop_unread_initializers(model, [b for b, n in readers.items() if n == 0])


def _bias_scale(node) -> float:
    """Gemm adds beta * C: a delta of the output is delta / beta of C."""
    if node.op_type != "Gemm":
        return 1.0
    beta = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "beta"), 1.0)
    if beta == 0:
        raise PlanError(f"compensation: Gemm '{node.name}' has beta 0; drop its entry")
    return float(beta)


def _outputs(node, inits) -> int:
    weight = inits.get(node.input[1])
    if weight is None:
        raise PlanError(
            f"compensation: node '{node.name}' reads computed weights; drop its entry from the plan"
        )
    dims = list(weight.dims)
    if node.op_type == "Conv":
        return dims[0]
    trans = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
    return dims[0] if trans else dims[1]


def _fresh(base: str, taken) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
