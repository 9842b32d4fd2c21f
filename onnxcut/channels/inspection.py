"""Describe a model: opset, inputs and outputs, parameters, FLOPs and parameter layers.

FLOPs here are multiply-accumulates (MACs) of Conv, ConvTranspose, Gemm and MatMul per
forward pass at the model's input shape; element-wise ops, pools and resizes are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from onnx import ModelProto, NodeProto

from onnxcut.graph.io import FLOAT_TYPES, GraphIndex, attrs, opset_version
from onnxcut.graph.shapes import dims, graph_inputs

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def count_params(model: ModelProto) -> int:
    """Count float weight elements in initializers (Constant nodes are folded by load())."""
    return sum(
        math.prod(t.dims) if t.dims else 1
        for t in model.graph.initializer
        if t.data_type in FLOAT_TYPES
    )


def _conv(index: GraphIndex, node: NodeProto) -> dict[str, Any]:
    w = index.shape(node.input[1])
    group = int(attrs(node).get("group", 1))
    out = index.static_shape(node.output[0])
    cout, cin_g, *kernel = w
    flops = math.prod(out) * cin_g * math.prod(kernel) if out else None
    return dict(
        in_channels=cin_g * group, out_channels=cout, kernel=kernel, groups=group, flops=flops
    )


def _conv_transpose(index: GraphIndex, node: NodeProto) -> dict[str, Any]:
    w = index.shape(node.input[1])
    group = int(attrs(node).get("group", 1))
    x = index.static_shape(node.input[0])
    cin, cout_g, *kernel = w
    # Every input pixel scatters a (cout/g x kernel) patch.
    flops = math.prod(x) * cout_g * math.prod(kernel) if x else None
    return dict(
        in_channels=cin, out_channels=cout_g * group, kernel=kernel, groups=group, flops=flops
    )


def _gemm(index: GraphIndex, node: NodeProto) -> dict[str, Any]:
    a = attrs(node)
    w = index.shape(node.input[1])
    k, n = (w[1], w[0]) if a.get("transB", 0) else (w[0], w[1])
    out = index.static_shape(node.output[0])
    return dict(
        in_channels=k,
        out_channels=n,
        kernel=[],
        groups=1,
        flops=math.prod(out) * k if out else None,
    )


def _matmul(index: GraphIndex, node: NodeProto) -> dict[str, Any]:
    b = index.shape(node.input[1]) or []
    a = index.shape(node.input[0]) or []
    k = b[-2] if len(b) >= 2 else (b[0] if b else (a[-1] if a else None))
    n = b[-1] if len(b) >= 2 else 1
    out = index.static_shape(node.output[0])
    ok = out is not None and isinstance(k, int)
    return dict(
        in_channels=k, out_channels=n, kernel=[], groups=1, flops=math.prod(out) * k if ok else None
    )


LAYER_RULES: dict[str, Callable[[GraphIndex, NodeProto], dict[str, Any]]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
}


def layers(model: ModelProto, index: GraphIndex | None = None) -> list[dict[str, Any]]:
    """List every parameter layer with channels, kernel, groups and FLOPs (None if unknown)."""
    index = index or GraphIndex(model)
    rows = []
    for node in model.graph.node:
        rule = LAYER_RULES.get(node.op_type)
        if rule is None or index.shape(node.input[1]) is None:
            continue
        rows.append({"name": node.name, "op": node.op_type, **rule(index, node)})
    return rows


def _io(values) -> list[dict[str, Any]]:
    return [{"name": v.name, "shape": dims(v)} for v in values]


def summarize(model: ModelProto) -> dict[str, Any]:
    """Return the inspect report: opset, IO, params, FLOPs (MACs) and the layer table."""
    index = GraphIndex(model)
    table = layers(model, index)
    if any(row["flops"] is None for row in table):
        # Shapes behind Shape arithmetic (x.chunk, view(x.size(0), -1)): fold a copy.
        from onnxcut.graph.folding import fold_shape_values

        table = layers(fold_shape_values(model))
    known = [row["flops"] for row in table if row["flops"] is not None]
    return {
        "opset": opset_version(model),
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": _io(graph_inputs(model)),
        "outputs": _io(model.graph.output),
        "params": count_params(model),
        "flops": sum(known) if len(known) == len(table) else None,
        "flops_unit": "MACs",
        "nodes": len(model.graph.node),
        "layers": table,
        **_groups(model),
    }


def _groups(model: ModelProto) -> dict[str, Any]:
    """Channel groups (see onnxcut.deps) and the share of weights they make removable."""
    from onnxcut.channels.deps import prunable_param_share, trace

    channels = trace(model)
    return {
        "groups": [g.to_dict() for g in channels.groups],
        "prunable_param_share": prunable_param_share(channels),
    }


def require_layers(model: ModelProto, source: str) -> None:
    """Raise for models with nothing to cut: commands that cut need a parameter layer."""
    from onnxcut.errors import ModelError

    if not any(n.op_type in LAYER_OPS for n in model.graph.node):
        raise ModelError(
            f"{source}: no Conv, ConvTranspose, Gemm or MatMul layer; "
            "onnxcut cuts channels of parameter layers, so pass a CNN model"
        )
