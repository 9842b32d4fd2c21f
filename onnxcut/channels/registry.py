"""The channel-rule table and the state a rule acts on, filled by the `@rule` decorator.

Rule modules (`compute_rules`, `layout_rules`, `reshape_rules`) import this module and
register one function per op; `deps.trace` imports them to fill the table and walks the
graph. Nothing here imports the driver back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import NodeProto

from onnxcut.graph.io import GraphIndex, opset_version

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
        # Channel shuffles seen at their splitting Reshape, by the name of the Reshape that
        # merges the channels back (see reshape_rules._start_shuffle).
        self.shuffles: dict[str, object] = {}

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

    @functools.cached_property
    def subgraph_reads(self) -> set[str]:
        """Outer-scope tensors that subgraphs (If, Loop, Scan) read without listing them."""
        return {x for n in self.index.graph.node for x in _subgraph_names(n)}

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


def node_reason(node: NodeProto, why: str) -> str:
    """A freeze reason that names the node and its op."""
    return f"node '{node.name}' ({node.op_type}) {why}"


def opset_of(t: Tracer) -> int:
    return opset_version(t.index.model)


def axis_index(value: int, rank: int) -> int:
    return value + rank if value < 0 else value


def write_ints(ctx: EditContext, node: NodeProto, i: int, attr: str, values, dtype) -> None:
    """Store new integer parameters in input `i`, or in attribute `attr` for old opsets."""
    if attr:
        ctx.set_attr(node, attr, [int(v) for v in values])
    else:
        ctx.set_const(node, i, np.asarray(values, dtype=dtype))
