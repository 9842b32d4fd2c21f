"""Tensor shapes: graph inputs, `--input-shape`, static-shape checks and shape inference."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import ModelProto, TensorProto

from onnxcut.errors import ModelError

log = logging.getLogger(__name__)

# Initializers above this size are described by shape alone during shape inference.
_INFER_INLINE_LIMIT = 4096


def graph_inputs(model: ModelProto) -> list[onnx.ValueInfoProto]:
    """Return the real inputs: IR-3 exports also list every initializer as an input."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def dims(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    """Return a tensor's dims: ints where static, the symbol (or '?') where dynamic."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]


def parse_input_shapes(specs: Iterable[str]) -> dict[str, list[int]]:
    """Parse `NAME:1x3x256x256` flags into {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for spec in specs:
        name, sep, text = spec.rpartition(":")
        try:
            shape = [int(d) for d in text.lower().split("x")]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) <= 0:
            raise ModelError(
                f"--input-shape '{spec}': expected NAME:DxDx..., e.g. input:1x3x256x256"
            )
        shapes[name] = shape
    return shapes


def fix_input_shapes_inplace(model: ModelProto, shapes: Mapping[str, Sequence[int]]) -> ModelProto:
    """Set the given inputs' dims and drop stale intermediate shapes."""
    inputs = {i.name: i for i in graph_inputs(model)}
    for name, shape in shapes.items():
        if name not in inputs:
            raise ModelError(
                f"--input-shape names '{name}', which is not a model input; "
                f"inputs: {', '.join(inputs) or 'none'}"
            )
        current = dims(inputs[name])
        if current is not None and len(current) != len(shape):
            raise ModelError(
                f"--input-shape {name}: rank {len(shape)} given, input has rank {len(current)} "
                f"({'x'.join(map(str, current))})"
            )
        for d, (old, new) in enumerate(zip(current or [None] * len(shape), shape, strict=True)):
            if isinstance(old, int) and old > 0 and old != new:
                raise ModelError(
                    f"--input-shape {name}: dim {d} is fixed at {old} in the model, not {new}"
                )
        tensor_type = inputs[name].type.tensor_type
        tensor_type.shape.Clear()
        for d in shape:
            tensor_type.shape.dim.add().dim_value = int(d)
    # Stale shapes downstream of the fixed inputs are re-inferred by infer_shapes(). Outputs
    # keep their rank: an output without a shape field fails the ONNX checker, and inference
    # cannot always give one back.
    del model.graph.value_info[:]
    for out in model.graph.output:
        if out.type.tensor_type.HasField("shape"):
            for dim in out.type.tensor_type.shape.dim:
                dim.Clear()
    return model


def declare_types_inplace(model: ModelProto) -> ModelProto:
    """Make declared types agree with the initializers and drop those that say nothing.

    Graph inputs naming an initializer take its type and dims (exporters leave the shape out,
    surgery changes the dims); before IR 4 every initializer is declared as a graph input.
    value_info entries without a tensor shape are dropped: inference derives nothing from
    them, and a shape-less type is what the ONNX checker refuses.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    declared = set()
    for value in graph.input:
        t = inits.get(value.name)
        if t is not None:
            value.type.CopyFrom(_tensor_type(t))
            declared.add(value.name)
    if model.ir_version < 4:
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in graph.initializer
            if t.name not in declared
        )
    useful = [v for v in graph.value_info if not _says_nothing(v)]
    if len(useful) < len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(useful)
    return model


def _tensor_type(t: TensorProto) -> onnx.TypeProto:
    return onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)).type


def _says_nothing(value: onnx.ValueInfoProto) -> bool:
    """No type, or a tensor type without element type or shape."""
    if not value.type.HasField("tensor_type"):
        return value.type.WhichOneof("value") is None
    tensor = value.type.tensor_type
    return not tensor.elem_type or not tensor.HasField("shape")


def default_batch_inplace(model: ModelProto, size: int = 1) -> list[str]:
    """Fix a dynamic batch dim to `size` where it is an input's only dynamic dim.

    Returns the names of the inputs changed, so callers can say what was assumed.
    """
    changed = {}
    for value in graph_inputs(model):
        d = dims(value)
        batch_dynamic = bool(d) and not (isinstance(d[0], int) and d[0] > 0)
        if batch_dynamic and all(isinstance(x, int) and x > 0 for x in d[1:]):
            changed[value.name] = [size, *d[1:]]
    if changed:
        fix_input_shapes_inplace(model, changed)
    return list(changed)


def require_static(model: ModelProto) -> None:
    """Raise, naming the input and the flag, if an input shape is not fully known."""
    for value in graph_inputs(model):
        d = dims(value)
        if d is None or not all(isinstance(x, int) and x > 0 for x in d):
            shown = "x".join(map(str, d)) if d else "unknown"
            hint = "x".join(
                str(x) if isinstance(x, int) and x > 0 else ("1" if i == 0 else "SIZE")
                for i, x in enumerate(d or ["N", "C", "H", "W"])
            )
            raise ModelError(
                f"input '{value.name}' has dynamic shape {shown}; fix it with "
                f"--input-shape {value.name}:{hint} (SIZE: your sizes)"
            )


def infer_shapes(model: ModelProto) -> ModelProto:
    """Run ONNX shape inference with data propagation, without copying large weights.

    Large initializers are described to the inferencer as typed inputs, so models over 2 GB
    and models with big weights infer quickly; the inferred value_info is copied back.
    """
    light = ModelProto()
    light.ir_version = max(model.ir_version, 4)
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    input_names = {i.name for i in model.graph.input}
    g.input.extend(model.graph.input)
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL and _numel(t) <= _INFER_INLINE_LIMIT:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
        # Data propagation follows every 1-D tensor as if it were a shape, holding one
        # symbol per element: only safe when all 1-D tensors are shape-sized.
        if not any(_is_long_vector(v) for v in [*g.input, *inferred.graph.value_info]):
            inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception as e:  # a bad shape somewhere must not stop commands that need none
        log.warning("shape inference failed (%s); shapes stay as exported", e)
        return model
    known_outputs = {o.name for o in model.graph.output}
    del model.graph.value_info[:]
    model.graph.value_info.extend(
        v for v in inferred.graph.value_info if v.name not in known_outputs
    )
    for out, new in zip(model.graph.output, inferred.graph.output, strict=True):
        stale = not out.type.tensor_type.HasField("shape") or _has_dynamic(out)
        if stale and new.type.tensor_type.HasField("shape"):
            out.CopyFrom(new)
    return model


def _is_long_vector(value: onnx.ValueInfoProto) -> bool:
    d = dims(value)
    return d is not None and len(d) == 1 and (not isinstance(d[0], int) or d[0] > 1024)


def _has_dynamic(value: onnx.ValueInfoProto) -> bool:
    d = dims(value)
    return d is None or not all(isinstance(x, int) and x > 0 for x in d)


def _numel(t: TensorProto) -> int:
    return int(np.prod(t.dims)) if t.dims else 1
