"""Which initializers train: weights at the inputs a parameter rule differentiates.

A float initializer trains when every node that reads it reads it at a weight position of
WEIGHT_INPUTS (a Conv's kernel and bias, a BatchNormalization's scale and bias, ...), or as a
per-channel operand of elementwise arithmetic (folded BatchNorm in Paddle and TFLite exports).
Scalars (the 3 and 6 of a spelled-out hard-swish), running statistics, shape vectors and
Resize scales stay constant. `--freeze` and `--freeze-op` take more out.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from onnx import ModelProto

from onnxcut.graph.io import FLOAT_TYPES, GraphIndex

# op -> input positions that hold trainable weights
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
# Elementwise ops whose constant operand trains when it holds more than one value.
PER_CHANNEL_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def trainable(
    model: ModelProto, freeze: Sequence[str] = (), freeze_ops: Sequence[str] = ()
) -> list[str]:
    """Names of the initializers that train, in graph order.

    `freeze` holds glob patterns matched against initializer names and the names of the
    nodes that read them; `freeze_ops` holds op types whose weights stay constant.
    """
    index = GraphIndex(model)
    frozen_ops = set(freeze_ops)
    names = []
    for init in model.graph.initializer:
        if init.data_type not in FLOAT_TYPES or init.name in index.inputs:
            continue
        readers = [
            (node, i)
            for node in index.consumers.get(init.name, [])
            for i, name in enumerate(node.input)
            if name == init.name
        ]
        if not readers or not all(_is_weight(node.op_type, i, init.dims) for node, i in readers):
            continue
        if any(node.op_type in frozen_ops for node, _ in readers):
            continue
        patterns = [init.name, *(node.name for node, _ in readers)]
        if any(fnmatch.fnmatchcase(n, p) for p in freeze for n in patterns):
            continue
        names.append(init.name)
    return names


def _is_weight(op: str, position: int, dims: Sequence[int]) -> bool:
    if position in WEIGHT_INPUTS.get(op, ()):
        return True
    size = 1
    for d in dims:
        size *= d
    return op in PER_CHANNEL_OPS and size > 1
