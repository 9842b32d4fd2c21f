"""Shape arithmetic folded into constants, for internal models only (the backward graph,
the shapes behind inspect's FLOPs).

Exporters compute slice bounds, reshape targets and resize sizes from Shape nodes
(`x.chunk(2, 1)`, `x.view(x.size(0), -1)`, `interpolate(size=x.shape[2:])`). ONNX's own data
propagation is turned off for models with long 1-D tensors (see shapes.infer_shapes), and the
rules need those sizes. With every input shape fixed, these values are constants: evaluate
them, one small node at a time, with ONNX's reference evaluator.

Surgery must never see a folded model: the values count channels that a plan cuts, and
the channel tracer follows them symbolically instead.

`fold_constant_subgraphs` is the other fold: computations fed by initializers alone (a bias
reshaped to (1, C, 1, 1), BatchNorm spelled as Mul/Add of reshaped constants, weights cast
from float16). Their values do not depend on any activation, so the channel tracer sees them
as the per-channel constants they are; what `extract` writes keeps the subgraphs.
"""

from __future__ import annotations

import logging

import numpy as np
from onnx import ModelProto, NodeProto, numpy_helper

from onnxcut.graph.io import GraphIndex, attrs, opset_version
from onnxcut.graph.shapes import infer_shapes

log = logging.getLogger(__name__)

_LIMIT = 4096  # elements: shape vectors and scalars, never weights
_ROUNDS = 8  # each round lets shape inference reach the next chain of shape arithmetic
# Ops whose value is not a function of their inputs' values alone, or that hold subgraphs.
_NEVER = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial"}
_NEVER |= {"If", "Loop", "Scan", "Bernoulli"}
# fmt: off
# Ops folded in constant subgraphs: layout changes, casts and correctly rounded IEEE
# arithmetic, which the reference evaluator computes as onnxruntime does.
CONSTANT_OPS = frozenset({
    "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose", "Cast", "Identity", "Concat",
    "Slice", "Gather", "Split", "Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal",
})
# fmt: on


def fold_shape_values(model: ModelProto) -> ModelProto:
    """Return `model` with Shape/Size of static tensors, and the small computations fed only
    by those and constants, replaced by initializers (a copy only if anything folds)."""
    folded_any = False
    for _ in range(_ROUNDS):
        index = GraphIndex(model)
        values = {
            t.name: numpy_helper.to_array(t)
            for t in model.graph.initializer
            if int(np.prod(t.dims)) <= _LIMIT
        }
        outputs = {o.name for o in model.graph.output}
        found: dict[str, np.ndarray] = {}
        done: set[str] = set()
        for node in model.graph.node:
            if any(o in outputs for o in node.output):
                continue
            result = _evaluate(node, index, values, opset_version(model))
            if result is None:
                continue
            found.update(result)
            values.update(result)  # later nodes of this round may read them
            done.add(node.name)
        if not done:
            break
        if not folded_any:
            copy = ModelProto()
            copy.CopyFrom(model)
            model, folded_any = copy, True
        keep = [n for n in model.graph.node if n.name not in done]
        del model.graph.node[:]
        model.graph.node.extend(keep)
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in found.items())
        model = infer_shapes(model)
        log.debug("folded %d shape computations", len(done))
    return model


def _evaluate(
    node: NodeProto, index: GraphIndex, values: dict[str, np.ndarray], opset: int
) -> dict[str, np.ndarray] | None:
    """The node's outputs, when they are small constants; None otherwise."""
    if node.op_type in ("Shape", "Size"):
        dims = index.shape(node.input[0])
        if dims is None or not all(isinstance(d, int) and d >= 0 for d in dims):
            return None
        shape = np.asarray(dims, np.int64)
        if node.op_type == "Size":
            return {node.output[0]: np.asarray(np.prod(shape), np.int64)}
        a = attrs(node)
        return {node.output[0]: shape[int(a.get("start", 0)) : a.get("end")]}
    inputs = [i for i in node.input if i]
    if node.op_type in _NEVER or not inputs or any(i not in values for i in inputs):
        return None
    results = _run(node, {i: values[i] for i in inputs}, opset)
    if results is None or any(np.size(r) > _LIMIT for r in results.values()):
        return None
    return results


def _run(node: NodeProto, feeds: dict[str, np.ndarray], opset: int) -> dict[str, np.ndarray] | None:
    """Evaluate one node with ONNX's reference evaluator; None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    try:
        results = ReferenceEvaluator(node, opsets={"": opset}).run(None, feeds)
    except Exception as e:  # an op the evaluator lacks: leave the node to the runtime
        log.debug("not folding %s (%s): %s", node.name, node.op_type, e)
        return None
    return {name: np.asarray(r) for name, r in zip(node.output, results, strict=False) if name}


def fold_constant_subgraphs(model: ModelProto) -> ModelProto:
    """Return `model` with the CONSTANT_OPS nodes fed only by initializers (and by nodes
    folded before them) replaced by initializers of their outputs' names; a copy only if
    anything folds.

    Node and tensor names stay, so a tensor of the folded model names the same value in
    `model`: a caller that must change a folded value replaces that tensor's use there.
    """
    graph = model.graph
    known = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    opset = opset_version(model)
    arrays: dict[str, np.ndarray] = {}
    folded: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for node in graph.node:
        inputs = [i for i in node.input if i]
        foldable = node.op_type in CONSTANT_OPS and node.domain in ("", "ai.onnx") and inputs
        if not foldable or any(o in outputs for o in node.output):
            continue
        if not all(i in known or i in folded for i in inputs):
            continue
        for i in inputs:
            if i not in arrays and i not in folded:
                arrays[i] = numpy_helper.to_array(known[i])
        results = _run(node, {i: folded[i] if i in folded else arrays[i] for i in inputs}, opset)
        if results is None:
            continue
        folded.update(results)
        done.add(node.name)
    if not done:
        return model
    copy = ModelProto()
    copy.CopyFrom(model)
    keep = [n for n in copy.graph.node if n.name not in done]
    del copy.graph.node[:]
    copy.graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    copy.graph.initializer.extend(
        numpy_helper.from_array(v, k) for k, v in folded.items() if k in used
    )
    log.debug("folded %d constant nodes", len(done))
    return infer_shapes(copy)
