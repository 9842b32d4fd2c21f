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

from onnx import ModelProto, NodeProto

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
# Ops that only reshape a weight on its way to where it is used (Paddle adds its biases
# through Reshape(bias, [1, C, 1, 1])): the weight trains if every use downstream does.
RESHAPING_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"})


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
        readers = _readers(index, init.name)
        if not readers or not all(_is_weight(index, node, i, init.dims) for node, i in readers):
            continue
        if any(node.op_type in frozen_ops for node, _ in readers):
            continue
        patterns = [init.name, *(node.name for node, _ in readers)]
        if any(fnmatch.fnmatchcase(n, p) for p in freeze for n in patterns):
            continue
        names.append(init.name)
    return names


def _readers(index: GraphIndex, name: str) -> list[tuple[NodeProto, int]]:
    return [
        (node, i)
        for node in index.consumers.get(name, [])
        for i, used in enumerate(node.input)
        if used == name
    ]


def _is_weight(index: GraphIndex, node: NodeProto, position: int, dims: Sequence[int]) -> bool:
    op = node.op_type
    if position in WEIGHT_INPUTS.get(op, ()):
        return True
    if op in RESHAPING_OPS and position == 0:
        out = node.output[0]
        readers = _readers(index, out)
        shape = index.shape(out) or dims
        return bool(readers) and all(_is_weight(index, n, i, shape) for n, i in readers)
    size = 1
    for d in dims:
        size *= d if isinstance(d, int) else 2
    return op in PER_CHANNEL_OPS and size > 1
