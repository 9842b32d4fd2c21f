"""The single driver: append the reverse-mode graph of one output to a model."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import onnx
from onnx import ModelProto, NodeProto, helper, version_converter

from onnxcut.errors import ModelError, UnsupportedOpError, first_line
from onnxcut.grad.batching import check_batchable
from onnxcut.grad.emitter import Emitter, Site
from onnxcut.grad.registry import VJP_RULES, supported_ops
from onnxcut.graph.folding import fold_shape_values
from onnxcut.graph.io import FLOAT_TYPES, GraphIndex, opset_version
from onnxcut.graph.shapes import infer_shapes

log = logging.getLogger(__name__)

# Emitted ops use opset-13 forms (axes as inputs); ScatterElements "add" (MaxPool's and
# Gather's gradients) needs opset 16.
MIN_OPSET = 13
SCATTER_ADD_OPSET = 16


def prepare(model: ModelProto) -> ModelProto:
    """Raise the model's opset to one the backward ops exist in, converting if needed, and
    fold shape arithmetic over static shapes into constants (the rules need those sizes).

    onnx.version_converter rewrites old ops on the way (Upsample becomes Resize).
    """
    current = opset_version(model)
    needs_scatter = any(n.op_type in ("MaxPool", "Gather") for n in model.graph.node)
    target = max(current, SCATTER_ADD_OPSET if needs_scatter else MIN_OPSET)
    if target == current:
        return fold_shape_values(model)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises bare RuntimeErrors and ValueErrors
        raise ModelError(
            f"cannot convert the model from opset {current} to {target} for the backward "
            f"graph ({first_line(e)}); re-export the "
            f"model at opset {target} or newer"
        ) from None
    log.info("converted the model from opset %d to %d for the backward graph", current, target)
    return fold_shape_values(infer_shapes(converted))


def backward(
    model: ModelProto,
    output: str,
    wrt: Sequence[str],
    seed: str,
    *,
    repeats: str | None = None,
    params: Sequence[str] = (),
    seeds: Mapping[str, str] | None = None,
) -> tuple[ModelProto, dict[str, str]]:
    """Append the gradient of `output`, seeded by tensor `seed`, w.r.t. each `wrt` tensor.

    `seed` must already exist in the model (an input or a computed tensor) and holds dL/d
    output. With `repeats` (a (1,) int64 tensor K) the seed's batch is K times the forward
    batch; a node that would mix the K copies raises BatchError, and a gradient output may be
    shaped (K, N, ...) instead of (K*N, ...). `params` names graph inputs that are weights,
    not data: they carry no batch axis, and their gradients sum over the batch (and the K
    copies). `seeds` adds {tensor: seed} terms for a loss that also reads tensors upstream of
    `output` (feature hints); each tensor must lead to `output`. Returns a new model whose
    extra outputs are the gradients, and {wrt: gradient name}.
    """
    assert opset_version(model) >= MIN_OPSET, "call prepare() first"
    new = ModelProto()
    new.CopyFrom(model)
    index = GraphIndex(new)
    _check_names(index, output, wrt)
    is_float = partial(_is_float, index)
    active = index.descendants(wrt, keep=is_float)
    relevant = index.ancestors([output])
    for name in wrt:
        if name not in relevant:
            raise ModelError(
                f"tensor '{name}' does not lead to output '{output}'; pick a tensor that "
                "the output depends on"
            )
    data = set(index.inputs) - set(params)
    emitter = Emitter(index, index.descendants(data), repeats)
    batch = (index.shape(output) or [None])[0]
    emitter.set_batch(batch)
    grads: dict[str, list[str]] = {output: [seed]}
    for name, extra in (seeds or {}).items():
        if name not in relevant:
            raise ModelError(f"tensor '{name}' does not lead to output '{output}'")
        grads.setdefault(name, []).append(extra)
    path = [
        n
        for n in index.graph.node
        if any(i in active for i in n.input) and any(o in relevant for o in n.output)
    ]
    if repeats is not None:
        floats = index.descendants(data, keep=is_float)
        for node in path:
            check_batchable(node, index, floats, batch)
    for node in reversed(path):
        dys = [_accumulate(emitter, grads, o) for o in node.output]
        if all(d is None for d in dys):
            continue
        rule = VJP_RULES.get(node.op_type)
        if rule is None:
            raise UnsupportedOpError(
                node,
                f"no VJP rule; supported: {', '.join(supported_ops())}; "
                "use --grad finite-diff for per-channel sums",
            )
        needs = [bool(i) and i in active for i in node.input]
        dxs = list(rule.fn(emitter, Site(node, dys, needs)))
        # Rules list every optional input; trailing ones the node omits must be None.
        assert all(d is None for d in dxs[len(node.input) :]), f"{node.op_type}: extra gradient"
        for name, need, dx in zip(node.input, needs, dxs + [None] * len(node.input), strict=False):
            if not need:
                continue
            if dx is None:
                raise UnsupportedOpError(node, f"no gradient w.r.t. input '{name}'")
            if rule.broadcast:
                dx = emitter.unbroadcast(dx, name, node.output[0], node)
            grads.setdefault(name, []).append(dx)
    result = {}
    for name in wrt:
        grad = _accumulate(emitter, grads, name)
        if grad is None:
            raise ModelError(
                f"tensor '{name}' reaches output '{output}' only through integer or boolean "
                "tensors, so no gradient flows; pick a float tensor nearer the output"
            )
        grad = emitter.views.get(grad, grad)
        if grad in index.inputs or grad in result.values():
            grad = emitter.op("Identity", [grad])
        result[name] = grad
    _attach(new, emitter, result)
    return new, result


def _check_names(index: GraphIndex, output: str, wrt: Sequence[str]) -> None:
    known = set(index.producer) | set(index.inputs)
    if output not in known:
        raise ModelError(
            f"output '{output}' is not a tensor of the graph; pass a node output or graph output"
        )
    if not wrt:
        raise ModelError("no tensors to differentiate with respect to; pass at least one")
    for name in wrt:
        if name not in known:
            raise ModelError(
                f"tensor '{name}' is not in the graph; pass a node output name "
                "(see `onnxcut inspect`)"
            )


def _is_float(index: GraphIndex, name: str) -> bool:
    dtype = index.dtype(name)
    return dtype is None or dtype == 0 or dtype in FLOAT_TYPES


def _accumulate(emitter: Emitter, grads: dict[str, list[str]], name: str) -> str | None:
    parts = grads.get(name)
    if not parts:
        return None
    if len(parts) > 1:
        total = emitter.op("Sum", parts) if len(parts) > 2 else emitter.op("Add", parts)
        grads[name] = [total]
    return grads[name][0]


def _attach(model: ModelProto, emitter: Emitter, result: dict[str, str]) -> None:
    """Add the live backward nodes and constants, and expose the gradients as outputs."""
    index = emitter.index
    needed = set(result.values())
    live: list[NodeProto] = []
    for node in reversed(emitter.nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    model.graph.node.extend(reversed(live))
    model.graph.initializer.extend(t for t in emitter.inits if t.name in needed)
    for name, grad in result.items():
        if grad in {o.name for o in model.graph.output}:
            continue
        dtype = index.dtype(name) or onnx.TensorProto.FLOAT
        model.graph.output.append(helper.make_tensor_value_info(grad, dtype, None))
