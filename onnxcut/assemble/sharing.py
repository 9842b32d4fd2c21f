"""Shared computation: identical nodes computed once, and same-model parts as one union.

`share_identical_inplace` is common-subexpression elimination over the assembled graph: two
nodes with the same op, attributes and inputs (initializers compared by their bytes) give the
same tensors, so the later one goes and its consumers read the earlier one's outputs. Parts
cut from one model keep their identical prefix once this way, exactly.

`union_plan` is CNN LEGO's same-model assembling: sub-networks given as plans on one model
become one sub-network that keeps, in every layer, the union of their channels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, helper

from onnxcut.attribution.probe import Head
from onnxcut.channels.deps import trace
from onnxcut.channels.plan import OutputKeep, Plan, resolve

# Ops whose two runs on one input may differ.
_RANDOM = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
    }
)
_SUBGRAPH = (AttributeProto.GRAPH, AttributeProto.GRAPHS)


def union_plan(
    model: ModelProto, plans: Sequence[Plan], head: Head, head_keep: Sequence[int]
) -> Plan:
    """The plan keeping every channel some plan keeps, and `head_keep` of the head output."""
    channels = trace(model)
    kept = np.zeros(len(channels.class_group), bool)
    for plan in plans:
        kept |= resolve(plan, channels)
    keep: dict[str, tuple[int, ...]] = {}
    for name, slots in channels.producer_slots.items():
        group = channels.group_of(name)
        if group.reason is not None or group.outputs:
            continue  # frozen groups stay whole; output groups are cut in `outputs`
        mine = kept[channels.slot_class[slots]]
        if not mine.all():
            keep[name] = tuple(int(c) for c in np.flatnonzero(mine))
    outputs: dict[str, OutputKeep] = {}
    for name in channels.index.outputs:
        cmap = channels.maps.get(name)
        if cmap is None:
            continue
        if name == head.output:
            mine = sorted(head_keep)
        else:
            mine = np.flatnonzero(kept[channels.slot_class[cmap.slots]]).tolist()
        if len(mine) < len(cmap.slots):
            outputs[name] = OutputKeep(tuple(int(c) for c in mine), cmap.axis)
    return Plan(keep, outputs)


def share_identical_inplace(model: ModelProto) -> int:
    """Compute identical nodes once; return how many nodes went.

    Nodes are visited in graph (topological) order, so a node's inputs are already renamed to
    their first equal when its own key is made.
    """
    graph = model.graph
    alias = _merge_initializers(graph)
    seen: dict[tuple, list[str]] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        key = _key(node)
        first = seen.get(key) if key is not None else None
        if first is None:
            if key is not None:
                seen[key] = list(node.output)
            keep.append(node)
            continue
        for mine, theirs in zip(node.output, first, strict=True):
            if mine:
                alias[mine] = theirs
    removed = len(graph.node) - len(keep)
    for out in graph.output:  # a graph output keeps its name through an Identity
        source = alias.get(out.name)
        if source is not None and source != out.name:
            keep.append(
                helper.make_node("Identity", [source], [out.name], name=f"{out.name}/shared")
            )
    del graph.node[:]
    graph.node.extend(keep)
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                _rename_in_subgraph(sub, alias)
    used = {x for n in graph.node for x in n.input} | _subgraph_reads(graph)
    used |= {o.name for o in graph.output}
    inits = [t for t in graph.initializer if t.name in used]
    if len(inits) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    gone = set(alias) - used
    values = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(values)
    return removed


def _merge_initializers(graph: GraphProto) -> dict[str, str]:
    """Map every initializer to the first one with the same type, dims and bytes."""
    by_content: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for t in graph.initializer:
        key = (t.data_type, tuple(t.dims), _digest(t))
        first = by_content.setdefault(key, t.name)
        if first != t.name:
            alias[t.name] = first
    return alias


def _digest(t: TensorProto) -> str:
    if t.HasField("raw_data"):
        return hashlib.sha256(t.raw_data).hexdigest()
    copy = TensorProto()
    copy.CopyFrom(t)
    copy.name = ""
    copy.doc_string = ""
    return hashlib.sha256(copy.SerializeToString()).hexdigest()


def _key(node) -> tuple | None:
    if node.op_type in _RANDOM or any(a.type in _SUBGRAPH for a in node.attribute):
        return None
    attrs = tuple(sorted((a.name, _attr_bytes(a)) for a in node.attribute))
    return (
        node.domain,
        node.op_type,
        attrs,
        tuple(node.input),
        tuple(bool(o) for o in node.output),
    )


def _attr_bytes(a: AttributeProto) -> bytes:
    copy = AttributeProto()
    copy.CopyFrom(a)
    copy.doc_string = ""
    return copy.SerializeToString()


def _rename_in_subgraph(graph: GraphProto, alias: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
        for a in node.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                _rename_in_subgraph(sub, alias)


def _subgraph_reads(graph: GraphProto) -> set[str]:
    found: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == AttributeProto.GRAPH else list(a.graphs):
                found |= {x for n in sub.node for x in n.input} | _subgraph_reads(sub)
    return found
