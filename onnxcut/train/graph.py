"""The training graph: one ONNX model that runs the forward pass, the loss, every trainable
parameter's gradient and the optimizer step.

Trainable initializers become graph inputs; the graph outputs their updated values and
optimizer states under `train/new/...`, so a trainer feeds each step's outputs back as the
next step's inputs without leaving the execution provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxcut.errors import ModelError, UnsupportedOpError
from onnxcut.grad.backward import backward, prepare
from onnxcut.graph.edit import retain
from onnxcut.graph.io import GraphIndex, opset_version
from onnxcut.graph.shapes import graph_inputs, infer_shapes
from onnxcut.train.builder import PREFIX, Builder
from onnxcut.train.losses import (
    LABEL_SCALE,
    LABELS,
    LOSSES,
    SCALE,
    TARGET,
    LossTerms,
    hint,
    hint_scale,
    hint_target,
    with_labels,
)
from onnxcut.train.optimizers import EPSILON, LR, OPTIMIZERS, Optimizer

LOSS = PREFIX + "loss"
BATCH = "N"
WEIGHTS = PREFIX + "weights"  # (B,) per image: 0 for the rows that pad a short last batch


def state_input(param: str, state: str) -> str:
    return f"{PREFIX}{state}/{param}"


def updated(name: str) -> str:
    """The output holding the new value of a parameter or state input."""
    return f"{PREFIX}new/{name}"


@dataclass
class TrainGraph:
    model: ModelProto
    data: str  # the image input
    logits: str  # the student tensor the loss reads
    params: list[str]
    states: list[str]  # optimizer state inputs, each shaped like its parameter
    scalars: list[str]  # fed per step: loss scales and optimizer scalars
    labels: bool = False
    shapes: dict[str, list[int]] = field(default_factory=dict)  # params and states

    @property
    def carried(self) -> list[str]:
        """Inputs whose next value the graph outputs (parameters and optimizer states)."""
        return [*self.params, *self.states]


def build(
    student: ModelProto,
    logits: str,
    axis: int,
    params: Sequence[str],
    *,
    kind: str = "softmax",
    temperature: float = 1.0,
    optimizer: Optimizer | None = None,
    labels: bool = False,
    batch: int = 16,
    hints: Sequence[str] = (),
) -> TrainGraph:
    """Make the training graph of `student` for loss `kind` on tensor `logits`, plus a
    feature hint at each tensor of `hints` (fed `hint_target` and `hint_scale` per step).

    The batch is static (shape rules need every size), so a short last batch is padded and
    its padding rows get weight 0 through the `train/weights` input.
    """
    optimizer = optimizer or Optimizer()
    model = ModelProto()
    model.CopyFrom(student)
    data = _data_input(model)
    shapes = _inputs_from_initializers(model, params)
    set_batch(model, data, batch)
    model = prepare(infer_shapes(model))
    index = GraphIndex(model)
    logit_dims = index.shape(logits)
    if logit_dims is None:
        raise ModelError(f"tensor '{logits}' has no known shape; pass --input-shape")
    elem = index.dtype(logits) or TensorProto.FLOAT
    target_dims = [batch, *logit_dims[1:]]
    fed = [
        helper.make_tensor_value_info(TARGET, elem, target_dims),
        helper.make_tensor_value_info(SCALE, elem, []),
        helper.make_tensor_value_info(WEIGHTS, elem, [batch]),
    ]
    if labels:
        fed += [
            helper.make_tensor_value_info(LABELS, elem, target_dims),
            helper.make_tensor_value_info(LABEL_SCALE, elem, []),
        ]
    for name in hints:
        shape = index.shape(name)
        if shape is None or index.dtype(name) not in (None, TensorProto.FLOAT):
            raise ModelError(f"hint tensor '{name}' has no known float shape; pass --input-shape")
        fed += [
            helper.make_tensor_value_info(hint_target(name), elem, [batch, *shape[1:]]),
            helper.make_tensor_value_info(hint_scale(name), elem, []),
        ]
    scalars = [LR, *([EPSILON] if optimizer.name == "adam" else [])]
    fed += [helper.make_tensor_value_info(s, elem, []) for s in scalars]
    model.graph.input.extend(fed)
    b = Builder("loss", opset=opset_version(model))

    def rows_for(rank: int) -> str:
        return b.op("Reshape", [WEIGHTS, b.ints([batch, *[1] * (rank - 1)])])

    rows = rows_for(len(logit_dims))
    terms = LOSSES[kind](b, logits, axis, temperature, rows)
    if labels:
        terms = with_labels(b, terms, logits, axis, rows)
    seeds = {}
    for name in hints:
        term = hint(b, name, rows_for(len(index.shape(name))))
        terms = LossTerms(b.op("Add", [terms.loss, term.loss]), terms.seed)
        seeds[name] = term.seed
    # A scalar whatever the reductions' opset gives: the trainer binds a () buffer for it.
    b.op("Reshape", [terms.loss, b.ints([])], LOSS)
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model = infer_shapes(model)
    try:
        model, grads = backward(model, logits, list(params), terms.seed, params=params, seeds=seeds)
    except UnsupportedOpError as e:
        reason = str(e).split(": ", 1)[1].split(";")[0]
        raise UnsupportedOpError(
            _Named(e.node_name, e.op),
            f"{reason} on a trained path; freeze the parameters before it with "
            "--freeze NAME or --freeze-op OP",
        ) from None
    states = _optimizer_step(model, optimizer, params, grads, shapes)
    keep_outputs(model, [LOSS, *(updated(n) for n in [*params, *states])])
    return TrainGraph(
        model,
        data,
        logits,
        list(params),
        states,
        [SCALE, *([LABEL_SCALE] if labels else []), *map(hint_scale, hints), *scalars],
        labels,
        shapes,
    )


@dataclass(frozen=True)
class _Named:
    """What UnsupportedOpError reads from a node, for re-raising with a training hint."""

    name: str
    op_type: str


def _data_input(model: ModelProto) -> str:
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"the student has {len(inputs)} inputs ({names}); distill needs one")
    return inputs[0].name


def _inputs_from_initializers(model: ModelProto, params: Sequence[str]) -> dict[str, list[int]]:
    wanted = set(params)
    moved = [t for t in model.graph.initializer if t.name in wanted]
    assert len(moved) == len(wanted), "a parameter is not an initializer"
    retain(model.graph.initializer, lambda t: t.name not in wanted)
    # Old exports (IR 3) list initializers as inputs already: declare each parameter once.
    retain(model.graph.input, lambda v: v.name not in wanted)
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in moved
    )
    return {t.name: list(t.dims) for t in moved}


def set_batch(model: ModelProto, data: str, batch: int | str) -> None:
    """Set the image input's batch: a size, or a name for a dynamic one."""
    for value in model.graph.input:
        if value.name == data:
            shape = value.type.tensor_type.shape
            if not shape.dim:
                raise ModelError(f"input '{data}' has no known rank; pass --input-shape")
            if shape.dim[0].dim_value > 0 and shape.dim[0].dim_value != batch:
                _rebatch_reshapes(model, data, shape.dim[0].dim_value, batch)
            shape.dim[0].Clear()
            if isinstance(batch, int):
                shape.dim[0].dim_value = batch
            else:
                shape.dim[0].dim_param = batch
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


def _rebatch_reshapes(model: ModelProto, data: str, old: int, new: int | str) -> None:
    """An export traced at a fixed batch spells it into Reshape targets (a channel shuffle's
    view(n, groups, ...)): where a Reshape of a tensor computed from the images has the old
    batch first in its target (and in its input, where that is known), the target takes the
    new one (0, "copy the input's", for a named batch)."""
    index = GraphIndex(model)
    carried = index.descendants([data])
    first = new if isinstance(new, int) else 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[0] not in carried:
            continue
        target, shape = index.const(node.input[1]), index.shape(node.input[0]) or [None]
        if target is None or not target.size or int(target[0]) != old:
            continue
        # An input of unknown first dim counts as the batch: the images reach it.
        batch_first = shape[0] == old or not isinstance(shape[0], int)
        if batch_first and not any(a.name == "allowzero" and a.i for a in node.attribute):
            fresh = numpy_helper.from_array(
                np.concatenate([[first], target[1:]]).astype(np.int64), f"{node.name}/rebatched"
            )
            model.graph.initializer.append(fresh)
            node.input[1] = fresh.name


def _optimizer_step(
    model: ModelProto,
    optimizer: Optimizer,
    params: Sequence[str],
    grads: dict[str, str],
    shapes: dict[str, list[int]],
) -> list[str]:
    rule = OPTIMIZERS[optimizer.name]
    index = GraphIndex(model)
    b = Builder("step")
    states = []
    for p in params:
        state = {s: state_input(p, s) for s in rule.states}
        elem = index.dtype(p) or TensorProto.FLOAT
        for name in state.values():
            model.graph.input.append(helper.make_tensor_value_info(name, elem, shapes[p]))
            shapes[name] = shapes[p]
            states.append(name)
        new_state = {s: updated(n) for s, n in state.items()}
        rule.emit(b, optimizer, p, grads[p], state, updated(p), new_state)
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    return states


def keep_outputs(model: ModelProto, outputs: list[str]) -> None:
    """Make `outputs` the graph's only outputs and drop what no longer feeds them."""
    del model.graph.output[:]
    model.graph.output.extend(
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs
    )
    needed = set(outputs)
    live = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(live))
    retain(model.graph.initializer, lambda t: t.name in needed)
    del model.graph.value_info[:]
