"""Checks `load` runs on a model before any pass walks it: what no exporter writes and the
later passes could only trip over, as one-line ModelErrors."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnx import AttributeProto, ModelProto, NodeProto, TensorProto, external_data_helper

from onnxcut.errors import ModelError
from onnxcut.graph.shapes import dims, graph_inputs


def check_graph(proto: ModelProto, source: str) -> None:
    """Refuse what the later passes cannot walk: a tensor written twice, a read of a tensor
    nothing writes, a cycle, or a weight whose data does not fill its dims."""
    graph = proto.graph
    names = [
        *(v.name for v in [*graph.input, *graph.output, *graph.initializer]),
        *(x for n in graph.node for x in (n.name, n.op_type, *n.input, *n.output)),
    ]
    garbled = next((x for x in names if not isinstance(x, str)), None)
    if garbled is not None:  # protobuf hands back bytes that are not UTF-8
        raise ModelError(
            f"{source}: name {garbled!r} is not UTF-8 text; the file is corrupt, re-export it"
        )
    given = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    writer: dict[str, NodeProto] = {}
    for node in graph.node:
        for out in filter(None, node.output):
            if out in writer or out in given:
                other = f"node '{writer[out].name}'" if out in writer else "a graph input"
                raise ModelError(
                    f"{source}: tensor '{out}' is written by node '{node.name}' and by {other}; "
                    "an ONNX graph writes each tensor once, re-export the model"
                )
            writer[out] = node
    waiting: dict[int, int] = {}
    readers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        missing = [x for x in node.input if x and x not in writer and x not in given]
        if missing:
            raise ModelError(
                f"{source}: node '{node.name}' ({node.op_type}) reads tensor '{missing[0]}', "
                "which no node, input or initializer gives; re-export the model"
            )
        deps = {x for x in node.input if x in writer}
        waiting[i] = len(deps)
        for x in deps:
            readers[x].append(i)
    ready = [i for i, n in waiting.items() if n == 0]
    while ready:
        for out in graph.node[ready.pop()].output:
            for j in readers.get(out, ()):
                waiting[j] -= 1
                if waiting[j] == 0:
                    ready.append(j)
    stuck = [graph.node[i] for i, n in waiting.items() if n > 0]
    if stuck:
        raise ModelError(
            f"{source}: node '{stuck[0].name}' ({stuck[0].op_type}) is on a cycle: it depends "
            "on its own output; re-export the model"
        )
    for node in graph.node:
        untyped = [a.name for a in node.attribute if a.type == AttributeProto.UNDEFINED]
        if untyped:
            raise ModelError(
                f"{source}: node '{node.name}' ({node.op_type}) has attribute '{untyped[0]}' "
                "without a type; the file is corrupt, re-export the model"
            )
    constants = [
        a.t
        for n in graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.type == AttributeProto.TENSOR
    ]
    for tensor in [*graph.initializer, *constants]:
        _check_data(tensor, source)


_KNOWN_TYPES = frozenset(TensorProto.DataType.values()) - {TensorProto.UNDEFINED}
# Bytes per element, and the typed field holding the values when raw_data is not used.
_ITEMSIZE = {
    TensorProto.FLOAT: (4, "float_data"),
    TensorProto.DOUBLE: (8, "double_data"),
    TensorProto.INT64: (8, "int64_data"),
    TensorProto.UINT64: (8, "uint64_data"),
    TensorProto.UINT32: (4, "uint64_data"),
    **{
        t: (size, "int32_data")
        for t, size in (
            (TensorProto.INT32, 4),
            (TensorProto.INT16, 2),
            (TensorProto.UINT16, 2),
            (TensorProto.INT8, 1),
            (TensorProto.UINT8, 1),
            (TensorProto.BOOL, 1),
            (TensorProto.FLOAT16, 2),
            (TensorProto.BFLOAT16, 2),
        )
    },
}


def _check_data(tensor: TensorProto, source: str) -> None:
    if tensor.data_type not in _KNOWN_TYPES:
        raise ModelError(
            f"{source}: tensor '{tensor.name}' has data type {tensor.data_type}, which ONNX does "
            "not define; the file is corrupt, re-export the model"
        )
    if tensor.data_type not in _ITEMSIZE or external_data_helper.uses_external_data(tensor):
        return
    size, field = _ITEMSIZE[tensor.data_type]
    n = _numel(tensor)
    if tensor.HasField("raw_data"):
        held, ok = f"{len(tensor.raw_data)} bytes", len(tensor.raw_data) == n * size
    else:
        count = len(getattr(tensor, field))
        held, ok = f"{count} values", count == n
    if min(tensor.dims, default=0) < 0 or not ok:
        raise ModelError(
            f"{source}: tensor '{tensor.name}' has dims {list(tensor.dims)} but holds {held}; "
            "the file is corrupt, re-export the model"
        )


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1


def check_input_sizes(proto: ModelProto, source: str) -> None:
    """Refuse image inputs with a dimension of 2^31 or more."""
    for value in graph_inputs(proto):
        huge = [d for d in dims(value) or [] if isinstance(d, int) and d >= 2**31]
        if huge:  # OpenCV, TensorRT and many kernels take 32-bit sizes
            raise ModelError(
                f"{source}: input '{value.name}' declares a dimension of {huge[0]}, 2^31 or "
                f"more; fix its shape with --input-shape {value.name}:DxDx..."
            )


def _positive(node: NodeProto, name: str, values) -> str | None:
    bad = [int(v) for v in values if int(v) < 1]
    return f"{name} {list(map(int, values))} has a value below 1" if bad else None


def _window(node: NodeProto, attrs: dict, weights: dict) -> str | None:
    """Conv-like and pooling windows: positive sizes, a pads list that fits the kernel."""
    for name in ("group", "strides", "dilations", "kernel_shape"):
        if name in attrs:
            values = attrs[name] if isinstance(attrs[name], list) else [attrs[name]]
            if (why := _positive(node, name, values)) is not None:
                return why
    pads = attrs.get("pads")
    rank = len(attrs["kernel_shape"]) if "kernel_shape" in attrs else None
    if rank is None and len(node.input) > 1 and node.input[1] in weights:
        rank = len(weights[node.input[1]]) - 2
    if rank is not None:
        if pads is not None and len(pads) != 2 * rank:
            return f"pads has {len(pads)} values for a {rank}-D window (needs {2 * rank})"
        for name in ("strides", "dilations", "output_padding"):
            if name in attrs and len(attrs[name]) != rank:
                return f"{name} has {len(attrs[name])} values for a {rank}-D window"
    if pads is not None and any(int(p) < 0 for p in pads):
        return f"pads {list(map(int, pads))} has a negative value"
    return None


# op -> a check of its attributes, returning why they are invalid (or None)
ATTRIBUTE_CHECKS = {op: _window for op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool")}


def check_attributes(proto: ModelProto, source: str) -> None:
    """Refuse attribute values no runtime accepts (a corrupt file that still parses)."""
    from onnx import helper

    weights = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        check = ATTRIBUTE_CHECKS.get(node.op_type)
        if check is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        why = check(node, attrs, weights)
        if why is not None:
            raise ModelError(
                f"{source}: node '{node.name}' ({node.op_type}): {why}; the file is corrupt or "
                "hand-edited, re-export the model"
            )
