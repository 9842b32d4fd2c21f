"""Apply a plan: `extract` slices channels out, `mask` zeroes them where they are consumed.

`mask` is the reference semantics: the same-shaped model in which every parameter layer's
weights for removed input channels are zero. `extract` computes the same values on every
kept channel with smaller tensors. Initializers and nodes the plan does not touch stay
bit-identical.

The trace sees constant subgraphs folded (deps.trace). Where a cut must change one's result
(a bias reshaped to (1, C, 1, 1), weights cast from float16), the consuming input gets an
initializer holding the sliced (or, in `mask`, zeroed) folded value, which is exactly what
the subgraph computed on the kept channels; the subgraph goes when nothing else reads it.
Subgraphs the plan does not touch stay as exported.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from onnxcut.channels.compensation import add_bias_deltas
from onnxcut.channels.deps import ChannelTrace, trace
from onnxcut.channels.inspection import LAYER_OPS, require_layers
from onnxcut.channels.plan import Plan, PlanLike, as_plan, resolve
from onnxcut.channels.registry import ConstSlice, EditContext
from onnxcut.errors import ModelError, first_line
from onnxcut.graph.edit import drop_unread_initializers, set_metadata
from onnxcut.graph.io import load, sha256
from onnxcut.graph.shapes import declare_types_inplace, infer_shapes

log = logging.getLogger(__name__)

CATEGORIES_KEY = "onnxcut.categories"
SELECTION_KEY = "onnxcut.selection"
KEPT_KEY = "onnxcut.kept"  # layer inputs -> the original channels they keep (distill's hints)
ModelLike = ModelProto | str | os.PathLike[str]
Shapes = Mapping[str, Sequence[int]]


def extract(model: ModelLike, plan: PlanLike, *, input_shapes: Shapes | None = None) -> ModelProto:
    """Return the model with the plan's removed channels sliced out of every tensor.

    `model` is a path or ModelProto, `plan` a Plan, dict or plan file path; `input_shapes`
    fixes dynamic inputs first (Flatten of dynamic spatial dims cannot be traced otherwise).
    """
    proto, channels, kept, plan = _prepare(model, plan, input_shapes)
    cut = _Cut(proto, channels, kept, slice_out=True)
    cut.apply()
    cut.finish_shapes()
    _record_categories(proto, channels, kept, plan)
    _record_kept(proto, channels, kept)
    if plan.selection:  # how the plan was chosen: a budget, an agreement guard
        set_metadata(proto, SELECTION_KEY, json.dumps(plan.selection, sort_keys=True))
    _check_result(proto, model, input_shapes)
    return proto


def mask(model: ModelLike, plan: PlanLike, *, input_shapes: Shapes | None = None) -> ModelProto:
    """Return the same-shaped model with removed channels' consumer weights zeroed."""
    proto, channels, kept, _ = _prepare(model, plan, input_shapes)
    _Cut(proto, channels, kept, slice_out=False).apply()
    _check_result(proto, model, input_shapes)
    return proto


def _check_result(proto: ModelProto, model: ModelLike, input_shapes: Shapes | None) -> None:
    """Run the ONNX checker on a result: a failure is a bug unless the input fails too."""
    try:
        _check(proto)
    except onnx.checker.ValidationError:
        try:
            _check(load(model, input_shapes))
        except onnx.checker.ValidationError as e:
            source = "the model" if isinstance(model, ModelProto) else str(model)
            raise ModelError(
                f"{source} fails the ONNX checker ({first_line(e)}); re-export it"
            ) from None
        raise


def _check(model: ModelProto) -> None:
    """Declare initializers as the IR version wants, then run the ONNX checker.

    The IR lets a graph input or output leave out its shape (any rank), the checker does not:
    one that neither the export nor shape inference gives a shape stays as exported, and the
    checker checks everything else on a copy that gives it an empty one.
    """
    declare_types_inplace(model)
    io = [*model.graph.input, *model.graph.output]
    unknown = [v.name for v in io if _rankless(v)]
    if unknown:
        log.info("inputs/outputs of unknown rank, kept so: %s", ", ".join(unknown))
        probe = ModelProto()
        probe.CopyFrom(model)
        for v in [*probe.graph.input, *probe.graph.output]:
            if _rankless(v):
                v.type.tensor_type.shape.SetInParent()
        model = probe
    onnx.checker.check_model(model)


def _rankless(value: onnx.ValueInfoProto) -> bool:
    return value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")


def _prepare(
    model: ModelLike, plan: PlanLike, input_shapes: Shapes | None
) -> tuple[ModelProto, ChannelTrace, np.ndarray, Plan]:
    plan = as_plan(plan)
    digest = None
    # model_sha256 names a file's bytes: a ModelProto (often already normalised by
    # onnxcut.load) has none to compare, and resolve() still checks layers and channels.
    if plan.model_sha256 and not isinstance(model, ModelProto) and Path(model).is_file():
        digest = sha256(model)
    proto = load(model, input_shapes)
    require_layers(proto, "<in-memory model>" if isinstance(model, ModelProto) else str(model))
    add_bias_deltas(proto, plan.compensation)  # before the trace: cut like any bias
    channels = trace(proto)
    return proto, channels, resolve(plan, channels, digest), plan


class _Cut(EditContext):
    """One application of a resolved plan to a loaded model, in place."""

    def __init__(
        self, model: ModelProto, channels: ChannelTrace, kept_class: np.ndarray, *, slice_out: bool
    ):
        self.model = model
        self.channels = channels
        self.slice_out = slice_out
        self.kept_slot = kept_class[channels.slot_class] if len(kept_class) else np.zeros(0, bool)
        # The trace may describe a folded copy (deps.trace): reach this model's nodes by name.
        self.nodes = {n.name: n for n in model.graph.node}
        self._folded = set(self.nodes) - set(channels.index.nodes)
        self._initializers = {t.name for t in model.graph.initializer}
        self._names = self._initializers | {o for n in model.graph.node for o in n.output}
        self._used = self._uses()
        self._replaced: set[str] = set()

    # -- EditContext -------------------------------------------------------------------------
    def kept(self, slots: np.ndarray) -> np.ndarray:
        return self.kept_slot[slots]

    def set_attr(self, node: NodeProto, name: str, value: object) -> None:
        if not self.slice_out:
            return
        node = self.nodes[node.name]
        for i, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[i]
                break
        if value is not None:
            node.attribute.append(helper.make_attribute(name, value))

    def set_const(self, node: NodeProto, input_index: int, value: np.ndarray) -> None:
        if not self.slice_out:
            return
        node = self.nodes[node.name]
        while len(node.input) <= input_index:
            node.input.append("")
        old = node.input[input_index]
        if old:
            self._replaced.add(old)
        name = self._unique(f"{old or node.name}_cut")
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        node.input[input_index] = name

    # -- the cut -----------------------------------------------------------------------------
    def apply(self) -> None:
        # Edits first: they also check constraints (grouped convs) in mask mode.
        for _, edit in self.channels.edits:
            edit(self)
        uses: dict[tuple[str, int], list[ConstSlice]] = defaultdict(list)
        for s in self.channels.slices:
            if self.slice_out or s.consume:
                uses[(s.node, s.input)].append(s)
        results: dict[str, dict[tuple[str, int], np.ndarray]] = defaultdict(dict)
        for (node_name, i), ops in uses.items():
            name = self.nodes[node_name].input[i]
            array = self.channels.index.const(name)
            new = array
            for op in ops:
                new = self._slice(new, op) if self.slice_out else self._zero(new, op)
            if new.shape != array.shape or not np.array_equal(new, array):
                results[name][(node_name, i)] = new
        for name, per_use in results.items():
            self._store(name, per_use)
        self._drop_unused()

    def _slice(self, array: np.ndarray, op: ConstSlice) -> np.ndarray:
        keep = self.kept(op.slots)
        if op.groups == 1:
            return np.compress(keep, array, axis=op.axis)
        # Grouped Conv weights (cout, cin/g, ...): rows of group g read its own inputs.
        local = keep.reshape(op.groups, -1)
        rows = array.shape[0] // op.groups
        blocks = [array[g * rows : (g + 1) * rows][:, local[g]] for g in range(op.groups)]
        return np.concatenate(blocks, axis=0)

    def _zero(self, array: np.ndarray, op: ConstSlice) -> np.ndarray:
        removed = ~self.kept(op.slots)
        if not removed.any():
            return array
        out = array.copy()
        if op.groups == 1:
            index = [slice(None)] * out.ndim
            index[op.axis] = removed
            out[tuple(index)] = 0
            return out
        local = removed.reshape(op.groups, -1)
        rows = out.shape[0] // op.groups
        for g in range(op.groups):
            out[g * rows : (g + 1) * rows, local[g]] = 0
        return out

    def _store(self, name: str, per_use: dict[tuple[str, int], np.ndarray]) -> None:
        """Replace an initializer in place, or give each differing use its own copy."""
        refs = [
            (n.name, i) for n in self.model.graph.node for i, x in enumerate(n.input) if x == name
        ]
        values = list(per_use.values())
        # A folded tensor (a constant subgraph's result) is replaced use by use, never in place.
        shared = (
            name in self._initializers
            and len(per_use) == len(refs)
            and all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values)
        )
        if shared and name not in {o.name for o in self.model.graph.output}:
            self._replace_initializer(name, values[0])
            return
        for (node_name, i), value in per_use.items():
            new = self._unique(f"{name}_{node_name}")
            self.model.graph.initializer.append(numpy_helper.from_array(value, new))
            self.nodes[node_name].input[i] = new
            self._replaced.add(name)

    def _replace_initializer(self, name: str, value: np.ndarray) -> None:
        for t in self.model.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(value, name))
                break
        for v in self.model.graph.input:  # IR < 4 lists initializers as inputs too
            if v.name == name:
                v.CopyFrom(
                    helper.make_tensor_value_info(name, v.type.tensor_type.elem_type, value.shape)
                )

    def _uses(self) -> set[str]:
        graph = self.model.graph
        return {x for n in graph.node for x in n.input} | {o.name for o in graph.output}

    def _drop_unused(self) -> None:
        """Drop what the cut left unused: initializers it replaced, and the folded constant
        subgraphs whose results it replaced by sliced copies."""
        graph = self.model.graph
        used = self._uses()
        while True:
            dead = [
                n
                for n in graph.node
                if n.name in self._folded
                and any(o in self._used for o in n.output)
                and not any(o in used for o in n.output)
            ]
            if not dead:
                break
            names = {n.name for n in dead}
            keep = [n for n in graph.node if n.name not in names]
            del graph.node[:]
            graph.node.extend(keep)
            self._replaced.update(x for n in dead for x in n.input)
            used = self._uses()
        drop_unread_initializers(self.model, self._replaced - used)

    def _unique(self, base: str) -> str:
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    def finish_shapes(self) -> None:
        """Drop stale intermediate shapes, set cut output dims, and infer again."""
        graph = self.model.graph
        del graph.value_info[:]
        for out in graph.output:
            cmap = self.channels.maps.get(out.name)
            shape = out.type.tensor_type.shape if out.type.tensor_type.HasField("shape") else None
            if cmap is None or shape is None or len(shape.dim) <= cmap.axis:
                continue
            dim = shape.dim[cmap.axis]
            dim.Clear()
            dim.dim_value = int(self.kept(cmap.slots).sum())
        infer_shapes(self.model)


def kept_positions(channels: ChannelTrace, kept_class: np.ndarray, tensor: str) -> np.ndarray:
    """Original indices along a tensor's channel axis that a resolved plan keeps."""
    cmap = channels.maps[tensor]
    return np.flatnonzero(kept_class[channels.slot_class[cmap.slots]])


def _record_kept(model: ModelProto, channels: ChannelTrace, kept: np.ndarray) -> None:
    """Store, for each computed tensor a layer reads as its data, the original channels it
    keeps along its channel axis, composed with any earlier cut, so `distill` can match a
    sub-network's features to its original's. Tensors sharing a selection share one list:
    {"kept": [[index, ...], ...], "tensors": {name: [axis, list number]}}.
    """
    earlier = read_kept(model)
    computed = {o for n in model.graph.node if n.op_type != "Constant" for o in n.output}
    lists: dict[tuple[int, ...], int] = {}
    tensors: dict[str, list[int]] = {}
    for node in model.graph.node:
        name = node.input[0] if node.input else ""
        cmap = channels.maps.get(name)
        if node.op_type not in LAYER_OPS or name not in computed or cmap is None:
            continue
        positions = kept_positions(channels, kept, name)
        before = earlier.get(name)
        if before is not None and len(before[1]) == len(cmap.slots):
            positions = np.asarray(before[1])[positions]
        key = tuple(int(p) for p in positions)
        tensors[name] = [cmap.axis, lists.setdefault(key, len(lists))]
    if tensors:
        value = json.dumps({"kept": [list(k) for k in lists], "tensors": tensors})
        set_metadata(model, KEPT_KEY, value)


def read_kept(model: ModelProto) -> dict[str, tuple[int, list[int]]]:
    """{tensor: (channel axis, kept original channels)} from `onnxcut.kept`, or {}."""
    props = {p.key: p.value for p in model.metadata_props}
    if KEPT_KEY not in props:
        return {}
    try:
        value = json.loads(props[KEPT_KEY])
        return {
            name: (int(axis), [int(i) for i in value["kept"][k]])
            for name, (axis, k) in value["tensors"].items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
        log.warning("ignoring unreadable %s metadata", KEPT_KEY)
        return {}


def _record_categories(
    model: ModelProto, channels: ChannelTrace, kept: np.ndarray, plan: Plan
) -> None:
    """Store output name -> original channel indices, composed with any earlier cut."""
    if not plan.outputs:
        return
    props = {p.key: p for p in model.metadata_props}
    earlier: dict[str, list[int]] = {}
    if CATEGORIES_KEY in props:
        try:
            earlier = json.loads(props[CATEGORIES_KEY].value)
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s metadata", CATEGORIES_KEY)
    categories = dict(earlier)
    for name in plan.outputs:
        positions = kept_positions(channels, kept, name).tolist()
        before = earlier.get(name)
        if isinstance(before, list) and len(before) == len(channels.maps[name].slots):
            positions = [before[p] for p in positions]
        categories[name] = positions
    set_metadata(model, CATEGORIES_KEY, json.dumps(categories))
