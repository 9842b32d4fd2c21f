"""One graph from several: each unit's names prefixed, one shared input, one category output.

A unit is the network one part (or several sub-networks of one model, as their union)
contributes. Its tensors, nodes and initializers are renamed `p<k>/...`, its inputs mapped
onto the shared ones. The category outputs are concatenated along the category axis and
gathered into the order asked; a segmentation output gets one background channel (the first
part's, or the maximum over the units'). Other outputs stay, under their prefixed names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper, numpy_helper

from onnxcut.attribution.probe import Head
from onnxcut.errors import ModelError
from onnxcut.graph.io import GraphIndex, opset_version
from onnxcut.graph.shapes import graph_inputs

JOIN = "assemble/"  # prefix of the nodes and tensors the join adds


@dataclass
class Unit:
    """The network one or more parts contribute, and its head."""

    parts: list[int]
    model: ModelProto
    head: Head
    prefix: str
    temperature: float = 1.0

    @property
    def n_channels(self) -> int:
        return self.head.n_categories


@dataclass(frozen=True)
class Channel:
    """One channel of the joined output: unit, channel of its head, and its origin."""

    unit: int
    channel: int
    origin: list  # [part, original category]; part -1: the maximum over the units


def harmonise_opsets(units: Sequence[Unit]) -> int:
    """Convert every unit to the highest default-domain opset among them; return it."""
    target = max(opset_version(u.model) for u in units)
    for u in units:
        version = opset_version(u.model)
        if version == target:
            continue
        try:
            u.model = onnx.version_converter.convert_version(u.model, target)
        except Exception as e:  # the converter raises bare RuntimeErrors per op
            first = " ".join(str(e).split())[:120]
            raise ModelError(
                f"part {u.parts[0]}: cannot convert opset {version} to {target} ({first}); "
                f"re-export it at opset {target}"
            ) from None
    return target


def join(
    units: Sequence[Unit],
    channels: Sequence[Channel],
    backgrounds: Sequence[Channel],
    *,
    input_names: Mapping[str, str] | None,
    output: str,
    resize_to: tuple[int, ...] | None,
) -> ModelProto:
    """Build the assembled model (unchecked, shapes not inferred).

    `input_names` maps each unit's input names onto the shared ones (None: same names);
    `backgrounds` holds one channel for a first-part background, several for their maximum.
    """
    first = units[0].model
    graph = GraphProto(name="assembled")
    shared = []
    for v in graph_inputs(first):
        value = onnx.ValueInfoProto()
        value.CopyFrom(v)
        value.name = (input_names or {}).get(v.name, v.name)
        shared.append(value)
    graph.input.extend(shared)
    names = _Names()
    scores: list[str] = []
    extra_outputs = []
    for u in units:
        mapping = {v.name: (input_names or {}).get(v.name, v.name) for v in graph_inputs(u.model)}
        g = _prefixed(u.model.graph, u.prefix, mapping)
        inits = {t.name for t in u.model.graph.initializer}
        graph.node.extend(g.node)
        graph.initializer.extend(g.initializer)
        graph.sparse_initializer.extend(g.sparse_initializer)
        graph.value_info.extend(g.value_info)
        for out in g.output:
            if out.name != u.prefix + u.head.output and out.name not in inits:
                extra_outputs.append(out)
        scores.append(_tempered(graph, u, names))
    scores = [
        _resized(graph, s, u, resize_to, names) if resize_to else s
        for s, u in zip(scores, units, strict=True)
    ]
    axis = units[0].head.axis
    offsets = np.cumsum([0] + [u.n_channels for u in units])
    joined = scores[0]
    if len(units) > 1:
        joined = names.node(graph, "Concat", scores, "concat", axis=axis)
    position = [int(offsets[c.unit] + c.channel) for c in channels]

    def gather(indices: list[int], name: str) -> str:
        index = names.const(graph, np.asarray(indices, np.int64), f"{name}_index")
        return names.node(graph, "Gather", [joined, index], name, axis=axis)

    if len(backgrounds) > 1:
        maxed = [
            gather([int(offsets[b.unit] + b.channel)], f"background{i}")
            for i, b in enumerate(backgrounds)
        ]
        background = names.node(graph, "Max", maxed, "background")
        rest = gather(position, "categories") if position else None
        parts = [background] + ([rest] if rest else [])
        final = names.node(graph, "Concat", parts, "joined", axis=axis) if rest else background
    else:
        order = [int(offsets[b.unit] + b.channel) for b in backgrounds] + position
        total = int(offsets[-1])
        final = joined if order == list(range(total)) else gather(order, "categories")
    last = graph.node[-1]
    if final.startswith(JOIN) and last.output[0] == final:
        last.output[0] = output  # the join's last node writes the output itself
    else:
        graph.node.append(helper.make_node("Identity", [final], [output], name=f"{JOIN}output"))
    graph.output.append(
        _output_value(units[0], output, len(backgrounds[:1]) + len(channels), resize_to)
    )
    graph.output.extend(extra_outputs)
    return _model(units, graph)


class _Names:
    """Unique names for what the join adds."""

    def __init__(self):
        self.count = 0

    def next(self, base: str) -> str:
        self.count += 1
        return f"{JOIN}{base}_{self.count}"

    def const(self, graph: GraphProto, value: np.ndarray, base: str) -> str:
        name = self.next(base)
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, graph: GraphProto, op: str, inputs: Sequence[str], base: str, **attrs) -> str:
        name = self.next(base)
        graph.node.append(helper.make_node(op, list(inputs), [name], name=name, **attrs))
        return name


def _tempered(graph: GraphProto, unit: Unit, names: _Names) -> str:
    """The unit's category tensor, its logits divided by the unit's temperature."""
    out = unit.prefix + unit.head.output
    if unit.temperature == 1.0:
        return out
    inv = names.const(graph, np.asarray(1.0 / unit.temperature, np.float32), "inv_temperature")
    score = unit.prefix + unit.head.score
    if score == out:
        return names.node(graph, "Mul", [out, inv], "tempered")
    # A Softmax/Sigmoid head: temper the logits under it, so its probabilities renormalise.
    tempered = names.next("tempered")
    for i, node in enumerate(graph.node):
        if out in node.output:
            node.input[0] = tempered
            graph.node.insert(i, helper.make_node("Mul", [score, inv], [tempered], name=tempered))
            break
    return out


def _resized(
    graph: GraphProto, tensor: str, unit: Unit, size: tuple[int, ...], names: _Names
) -> str:
    shape = GraphIndex(unit.model).shape(unit.head.output) or []
    spatial = [a for a in range(len(shape)) if a not in (0, unit.head.axis)]
    if tuple(shape[a] for a in spatial) == tuple(size):
        return tensor
    if opset_version(unit.model) < 11:
        raise ModelError("--resize-outputs needs opset 11 or later; convert the parts first")
    rest = np.asarray(
        [
            unit.n_channels if a == unit.head.axis else size[spatial.index(a)]
            for a in range(1, len(shape))
        ],
        np.int64,
    )
    batch = names.node(
        graph,
        "Slice",
        [
            names.node(graph, "Shape", [tensor], "shape"),
            names.const(graph, np.asarray([0], np.int64), "start"),
            names.const(graph, np.asarray([1], np.int64), "end"),
        ],
        "batch",
    )
    sizes = names.node(graph, "Concat", [batch, names.const(graph, rest, "size")], "sizes", axis=0)
    empty = (
        ""
        if opset_version(unit.model) >= 13
        else names.const(graph, np.zeros(0, np.float32), "empty")
    )
    return names.node(
        graph,
        "Resize",
        [tensor, empty, empty, sizes],
        "resized",
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )


def _output_value(unit: Unit, name: str, count: int, size) -> onnx.ValueInfoProto:
    index = GraphIndex(unit.model)
    shape = list(index.shape(unit.head.output) or [])
    spatial = [a for a in range(len(shape)) if a not in (0, unit.head.axis)]
    if shape:
        shape[unit.head.axis] = count
        for i, a in enumerate(spatial):
            if size:
                shape[a] = size[i]
    shape = [
        d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in shape
    ]
    dtype = index.dtype(unit.head.output) or TensorProto.FLOAT
    return helper.make_tensor_value_info(name, dtype, shape or None)


def _prefixed(graph: GraphProto, prefix: str, inputs: Mapping[str, str]) -> GraphProto:
    g = GraphProto()
    g.CopyFrom(graph)
    inits = {t.name for t in g.initializer}
    real = [v for v in g.input if v.name not in inits]  # IR 3 declares initializers too
    del g.input[:]
    g.input.extend(real)
    _rename(g, lambda n: n if not n else inputs.get(n, prefix + n), prefix)
    return g


def _rename(g: GraphProto, name: Callable[[str], str], prefix: str) -> None:
    for node in g.node:
        node.name = prefix + node.name
        new_in, new_out = [name(x) for x in node.input], [name(x) for x in node.output]
        del node.input[:]
        node.input.extend(new_in)
        del node.output[:]
        node.output.extend(new_out)
        for a in node.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                _rename(sub, name, prefix)
    for t in g.initializer:
        t.name = name(t.name)
    for s in g.sparse_initializer:
        s.values.name = name(s.values.name)
        s.indices.name = name(s.indices.name)
    for v in [*g.input, *g.output, *g.value_info]:
        v.name = name(v.name)


def _model(units: Sequence[Unit], graph: GraphProto) -> ModelProto:
    opsets: dict[str, int] = {}
    for u in units:
        for entry in u.model.opset_import:
            domain = "" if entry.domain == "ai.onnx" else entry.domain
            if domain in opsets and opsets[domain] != entry.version and domain:
                raise ModelError(
                    f"part {u.parts[0]} imports {domain} opset {entry.version}, an earlier part "
                    f"{opsets[domain]}; export the parts with one {domain} version"
                )
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    )
    model.ir_version = max(u.model.ir_version for u in units)
    model.producer_name = "onnxcut"
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    for u in units:
        for f in u.model.functions:
            key = (f.domain, f.name)
            if key in functions and functions[key] != f:
                raise ModelError(
                    f"part {u.parts[0]} defines function {f.domain}.{f.name} unlike an earlier "
                    "part; rename it in one of them"
                )
            functions[key] = f
    model.functions.extend(functions.values())
    return model
