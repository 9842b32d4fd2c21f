"""Channel-dependency groups: which channels of which tensors must be cut together.

Every output channel of a parameter layer (Conv, ConvTranspose, Gemm, MatMul) is a *slot*.
Walking the graph once in order, `channel_rules.CHANNEL_RULES` says for each op how the slots
of its inputs reach its outputs: unchanged, shifted by offset (Concat, Split), coupled
(residual Add), or consumed by weights. Coupled slots are merged into one *class*: the unit
of removal. Classes that share a producer form a `ChannelGroup`, the unit a plan names. Any
slot whose fate cannot be proven is frozen with a reason; a frozen group is never cut.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto, NodeProto

from onnxcut.graph.io import GraphIndex, load

PRODUCER, PAD, OPAQUE = "producer", "pad", "opaque"

Rule = Callable[["Tracer", NodeProto], None]
CHANNEL_RULES: dict[str, Rule] = {}
# (op, input index) pairs that read shape vectors knowingly; any other reader of a vector
# holding a channel count freezes that channel's group.
SHAPE_READERS: set[tuple[str, int]] = set()


def rule(*ops: str) -> Callable[[Rule], Rule]:
    """Register how channels pass through `ops`; a second rule for one op is a bug."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            if op in CHANNEL_RULES:
                raise ValueError(f"duplicate channel rule for {op}")
            CHANNEL_RULES[op] = fn
        return fn

    return register


@dataclass(frozen=True)
class ChannelMap:
    """The slot each position along `axis` of a tensor carries (repeats: Flatten blocks)."""

    axis: int
    slots: np.ndarray  # (C,) int


@dataclass(frozen=True)
class ConstSlice:
    """An initializer input of a node whose `axis` follows channels.

    `consume` marks input-channel weights of a parameter layer, which `mask` zeroes. With
    `groups` > 1 the axis holds per-group local input indices (grouped Conv weights), the
    rows being split into `groups` blocks.
    """

    node: str
    input: int
    axis: int
    slots: np.ndarray  # (len along axis,) int, or the full input slots when groups > 1
    consume: bool = False
    groups: int = 1


class EditContext:
    """What an edit may do to its node; `surgery` implements it for extract and mask."""

    def kept(self, slots: np.ndarray) -> np.ndarray:  # (len,) bool
        raise NotImplementedError

    def set_attr(self, node: NodeProto, name: str, value: object) -> None:
        raise NotImplementedError

    def set_const(self, node: NodeProto, input_index: int, value: np.ndarray) -> None:
        raise NotImplementedError


Edit = Callable[[EditContext], None]


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


class Tracer:
    """Mutable state of one walk: tensor channel maps, slot classes, freezes and edits."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.maps: dict[str, ChannelMap] = {}
        # Shape vectors computed from tensor shapes: per element ("c", value) for a constant,
        # ("d", tensor, axis, channel_dependent) for a dim, or None where unknown.
        self.values: dict[str, list[tuple | None]] = {}
        self._parent: list[int] = []
        self.source: list[tuple[str, str]] = []  # slot -> (kind, node or tensor name)
        self.reasons: dict[int, str] = {}  # slot -> first freeze reason
        self.slices: list[ConstSlice] = []
        self.edits: list[tuple[str, Edit]] = []
        self.consumers: list[tuple[str, np.ndarray]] = []
        self.producer_slots: dict[str, np.ndarray] = {}
        # (slots, n): a grouped Conv's input or output channels, split into n blocks that
        # must each keep the same number of channels.
        self.blocks: list[tuple[np.ndarray, int]] = []

    # -- slots ------------------------------------------------------------------------------
    def new_slots(self, kind: str, name: str, n: int) -> np.ndarray:
        start = len(self._parent)
        self._parent.extend(range(start, start + n))
        self.source.extend([(kind, name)] * n)
        slots = np.arange(start, start + n, dtype=np.int64)
        if kind == PRODUCER:
            self.producer_slots[name] = slots
        return slots

    def find(self, s: int) -> int:
        parent = self._parent
        root = s
        while parent[root] != root:
            root = parent[root]
        while parent[s] != root:
            parent[s], s = root, parent[s]
        return root

    def couple(self, a: np.ndarray, b: np.ndarray) -> None:
        assert len(a) == len(b)
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def freeze(self, slots: np.ndarray | ChannelMap | None, reason: str) -> None:
        if isinstance(slots, ChannelMap):
            slots = slots.slots
        if slots is None:
            return
        for s in np.unique(slots).tolist():
            self.reasons.setdefault(s, reason)

    # -- tensors ----------------------------------------------------------------------------
    def get(self, name: str) -> ChannelMap | None:
        return self.maps.get(name) if name else None

    def set(self, name: str, cmap: ChannelMap | None) -> None:
        if name and cmap is not None:
            self.maps[name] = cmap

    def const(self, name: str) -> np.ndarray | None:
        return self.index.const(name) if name else None

    def shape(self, name: str) -> list[int | str] | None:
        return self.index.shape(name) if name else None

    def rank(self, name: str) -> int | None:
        d = self.shape(name)
        return None if d is None else len(d)

    def value(self, name: str) -> list[tuple | None] | None:
        """Return a shape vector's elements (see `values`), constants included."""
        if name in self.values:
            return self.values[name]
        c = self.const(name)
        if c is not None and c.dtype.kind in "iu" and c.ndim <= 1:
            return [("c", int(v)) for v in c.reshape(-1)]
        return None

    def freeze_value(self, name: str, reason: str) -> None:
        """Freeze the tensors whose channel count a shape vector depends on."""
        for e in self.values.get(name) or []:
            if e is not None and e[0] == "d" and e[3]:
                self.freeze(self.get(e[1]), reason)

    # -- what surgery will do ---------------------------------------------------------------
    def slice_const(self, node: NodeProto, i: int, axis: int, slots: np.ndarray, **kw) -> bool:
        """Record that initializer input `i` follows `slots` on `axis`; False if computed."""
        if self.const(node.input[i]) is None:
            return False
        self.slices.append(ConstSlice(node.name, i, axis, slots, **kw))
        return True

    def edit(self, node: NodeProto, fn: Edit) -> None:
        self.edits.append((node.name, fn))

    def consumer(self, node: NodeProto, slots: np.ndarray) -> None:
        self.consumers.append((node.name, slots))


def untraced(t: Tracer, node: NodeProto, why: str) -> None:
    """Freeze every channel a node reads, for an op or pattern no rule can prove safe."""
    reason = f"node '{node.name}' ({node.op_type}) {why}"
    for name in [*node.input, *_subgraph_names(node)]:
        t.freeze(t.get(name), reason)
        t.freeze_value(name, reason)


def _subgraph_names(node: NodeProto) -> list[str]:
    """Outer-scope tensors a subgraph (If, Loop, Scan) reads without listing them as inputs."""
    names: list[str] = []
    for a in node.attribute:
        for g in [a.g] if a.HasField("g") else list(a.graphs):
            for n in g.node:
                names.extend(n.input)
                names.extend(_subgraph_names(n))
    return names


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
    """Walk a loaded model once and return its channel groups and surgery records."""
    # The rule modules register themselves in CHANNEL_RULES on import.
    from onnxcut.channels import compute_rules, layout_rules  # noqa: F401

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
