"""Channel-dependency groups: which channels of which tensors must be cut together.

Every output channel of a parameter layer (Conv, ConvTranspose, Gemm, MatMul) is a *slot*.
Walking the graph once in order, the rule table (`registry.CHANNEL_RULES`) says for each op
how the slots of its inputs reach its outputs: unchanged, shifted by offset (Concat, Split), coupled
(residual Add), or consumed by weights. Coupled slots are merged into one *class*: the unit
of removal. Classes that share a producer form a `ChannelGroup`, the unit a plan names. Any
slot whose fate cannot be proven is frozen with a reason; a frozen group is never cut.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto

from onnxcut.channels.registry import (
    CHANNEL_RULES,
    SHAPE_READERS,
    ChannelMap,
    ConstSlice,
    Edit,
    Tracer,
    untraced,
)
from onnxcut.graph.folding import fold_constant_subgraphs
from onnxcut.graph.io import GraphIndex, load


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled, and whether a plan may cut them."""

    id: int
    producers: list[str]
    consumers: list[str]
    channels: int
    reason: str | None = None  # why the group is frozen, None when it is not
    outputs: list[str] = field(default_factory=list)  # graph outputs carrying its channels

    @property
    def prunable(self) -> bool:
        return self.reason is None and not self.outputs

    def to_dict(self) -> dict[str, object]:
        """The inspect --json entry: id, producers, consumers, channels, prunable, reason."""
        return {
            "id": self.id,
            "producers": self.producers,
            "consumers": self.consumers,
            "channels": self.channels,
            "prunable": self.prunable,
            "reason": self.frozen_reason,
        }

    @property
    def frozen_reason(self) -> str | None:
        """Why a plain `keep` entry may not cut this group, or None."""
        if self.reason is not None:
            return self.reason
        if self.outputs:
            names = ", ".join(f"'{o}'" for o in self.outputs)
            return f"its channels reach graph output {names}; cut it in the plan's outputs section"
        return None


@dataclass
class ChannelTrace:
    """The result of a walk: groups plus everything `surgery` needs to act on them."""

    index: GraphIndex
    groups: list[ChannelGroup]
    maps: dict[str, ChannelMap]
    slot_class: np.ndarray  # (slots,) class id of each slot
    class_group: np.ndarray  # (classes,) group id of each class, -1 for none
    producer_slots: dict[str, np.ndarray]
    slices: list[ConstSlice]
    edits: list[tuple[str, Edit]]
    blocks: list[tuple[np.ndarray, int]] = field(default_factory=list)

    def group_of(self, producer: str) -> ChannelGroup:
        slots = self.producer_slots[producer]
        return self.groups[int(self.class_group[self.slot_class[slots[0]]])]


def trace(model: ModelProto) -> ChannelTrace:
    """Walk a loaded model once and return its channel groups and surgery records.

    The walk sees the model with its constant subgraphs folded (a bias reshaped to
    (1, C, 1, 1) is a per-channel constant), so `index` may describe a folded copy: its node
    and tensor names are those of `model`, and `surgery` maps what it records back by name.
    """
    # The rule modules register themselves in CHANNEL_RULES on import.
    from onnxcut.channels import compute_rules, layout_rules, reshape_rules  # noqa: F401

    model = fold_constant_subgraphs(model)
    index = GraphIndex(model)
    t = Tracer(index)
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in t.values and (node.op_type, i) not in SHAPE_READERS:
                t.freeze_value(name, f"node '{node.name}' ({node.op_type}) computes with it")
        default = node.domain in ("", "ai.onnx")
        fn = CHANNEL_RULES.get(node.op_type) if default else None
        if fn is None:
            untraced(t, node, "has no channel rule; its channels cannot be traced")
        else:
            fn(t, node)
    return _collect(t)


def _collect(t: Tracer) -> ChannelTrace:
    n = len(t.source)
    roots = np.array([t.find(s) for s in range(n)], dtype=np.int64)
    _, slot_class = np.unique(roots, return_inverse=True)
    n_classes = int(slot_class.max()) + 1 if n else 0
    # Classes fed by one source node belong to one group: a plan names that node.
    comp = list(range(n_classes))

    def find(c: int) -> int:
        while comp[c] != c:
            comp[c] = comp[comp[c]]
            c = comp[c]
        return c

    first: dict[tuple[str, str], int] = {}
    for s in range(n):
        c = int(slot_class[s])
        other = first.setdefault(t.source[s], c)
        a, b = find(c), find(other)
        if a != b:
            comp[max(a, b)] = min(a, b)
    class_comp = np.array([find(c) for c in range(n_classes)], dtype=np.int64)

    groups: list[ChannelGroup] = []
    class_group = np.full(n_classes, -1, dtype=np.int64)
    by_comp: dict[int, ChannelGroup] = {}
    for name, slots in t.producer_slots.items():
        c = int(class_comp[slot_class[slots[0]]])
        if c not in by_comp:
            by_comp[c] = ChannelGroup(len(groups), [], [], 0)
            groups.append(by_comp[c])
        by_comp[c].producers.append(name)
    for c, g in by_comp.items():
        members = class_comp == c
        class_group[members] = g.id
        g.channels = int(members.sum())
    slot_group = class_group[slot_class] if n else np.zeros(0, dtype=np.int64)
    for s, reason in sorted(t.reasons.items()):
        g_id = int(slot_group[s])
        if g_id >= 0 and groups[g_id].reason is None:
            groups[g_id].reason = reason
    for name, slots in t.consumers:
        for g_id in np.unique(slot_group[slots]).tolist():
            if g_id >= 0 and name not in groups[g_id].consumers:
                groups[g_id].consumers.append(name)
    for out in t.index.outputs:
        cmap = t.get(out)
        if cmap is not None:
            for g_id in np.unique(slot_group[cmap.slots]).tolist():
                if g_id >= 0:
                    groups[g_id].outputs.append(out)
    return ChannelTrace(
        t.index,
        groups,
        t.maps,
        slot_class,
        class_group,
        t.producer_slots,
        t.slices,
        t.edits,
        t.blocks,
    )


def build_groups(model: ModelProto | str | os.PathLike[str]) -> list[ChannelGroup]:
    """Return the channel groups of a model (a path or ModelProto; loaded and normalised)."""
    return trace(load(model)).groups


def prunable_param_share(channels: ChannelTrace) -> float:
    """Return the fraction of parameter-layer weight elements a plan could remove.

    A weight element is removable when its output or its input channel is in a prunable group.
    """
    index = channels.index

    def share(tensor: str) -> float:
        cmap = channels.maps.get(tensor)
        if cmap is None:
            return 0.0
        groups = channels.class_group[channels.slot_class[cmap.slots]]
        return float(np.mean([g >= 0 and channels.groups[g].prunable for g in groups.tolist()]))

    total = removable = 0.0
    for node in index.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        w = index.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if w is None:
            continue
        size = float(np.prod(w.dims))
        total += size
        removable += size * (1 - (1 - share(node.output[0])) * (1 - share(node.input[0])))
    return removable / total if total else 0.0
