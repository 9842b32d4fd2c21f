"""A few lines of graph building shared by the loss and optimizer tables."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

PREFIX = "train/"
# Reductions take their axes as an input from these opsets on (an attribute before).
AXES_INPUT_SINCE = {"ReduceSum": 13}
AXES_INPUT_DEFAULT = 18


class Builder:
    """Append nodes and constants under `train/<scope>/`, with unique names."""

    def __init__(self, scope: str, dtype: type = np.float32, opset: int = 13):
        self.scope = scope
        self.opset = opset
        self.nodes: list[NodeProto] = []
        self.inits: list[TensorProto] = []
        self.dtype = dtype
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{PREFIX}{self.scope}/{hint}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs)
        )
        return out

    def scalar(self, value: float) -> str:
        name = self.name("scalar")
        self.inits.append(numpy_helper.from_array(np.asarray(value, self.dtype), name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        name = self.name("ints")
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """A reduction over `axes`, spelled for the graph's opset."""
        if self.opset >= AXES_INPUT_SINCE.get(op_type, AXES_INPUT_DEFAULT):
            return self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)
