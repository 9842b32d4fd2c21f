"""A category's Model LEGO decision route as a graph: top channels per layer, and their links.

Nodes are the channels with the highest mean relevance (`relevance/<layer>` in a classifier's
scores file) of each layer, from the input side to the head, whose node is the category's
logit. An edge from channel j of layer P to channel o of a later layer L is drawn when L reads
j (directly, or through BatchNorm, pools, residual Adds and Concat: the channel classes of the
dependency trace); its weight is o's relevance times the share of o's positive weights that
read j, the alpha-beta rule's split with every input position weighted alike. Edges need the
model; without it the graph shows the nodes only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto

from onnxcut.attribution.scores import Scores

# Edges kept into each column: the strongest, at most this many per node there, and none
# weaker than this share of the strongest; more turn the figure into a hairball.
_EDGES_PER_NODE = 2
_MIN_EDGE = 0.1


@dataclass
class RouteGraph:
    category: int
    columns: list[str]  # layer names, input side first
    nodes: list[list[tuple[int, float]]]  # per column: (channel, share of its relevance) > 0
    edges: list[tuple[int, int, int, int, float]] = field(default_factory=list)
    # (column a, row a, column b, row b, weight relative to the strongest into column b)
    layers_total: int = 0  # layers on the whole route, before trimming to the last ones
    head: bool = False  # the last column is the head, whose one node is the category's logit

    @property
    def has_edges(self) -> bool:
        return bool(self.edges)


def route_graph(
    scores: Scores,
    category: int,
    model: ModelProto | None = None,
    top: int = 6,
    max_layers: int = 24,
) -> RouteGraph:
    """The `top` channels of the last `max_layers` layers on `category`'s route, and edges."""
    names = scores.layers("relevance")
    assert names, "route_graph needs relevance scores (a classify run)"
    relevance = {n: scores.mean("relevance", n)[category] for n in names}  # name -> (C,)
    layers = {}
    head = None
    if model is not None:
        from onnxcut.attribution.relevance import Route

        score = scores.meta.get("score") or scores.meta.get("output") or ""
        route = Route(model, score)
        layers = {la.name: la for la in route.layers}
        head = route.head
    columns = [n for n in names if not layers or n in layers]
    if head is not None and head.name not in relevance:
        columns.append(head.name)
        one_hot = np.zeros(len(head.out_class))
        one_hot[category] = 1.0
        relevance[head.name] = one_hot
    total = len(columns)
    columns = columns[-max_layers:]
    nodes = []
    for name in columns:
        r = np.maximum(relevance[name], 0.0)
        mass = r.sum()
        order = [c for c in np.argsort(-r, kind="stable")[:top] if r[c] > 0]
        nodes.append([(int(c), float(r[c] / mass)) for c in order])
    graph = RouteGraph(category, columns, nodes, layers_total=total)
    graph.head = head is not None and columns[-1] == head.name
    if layers:
        graph.edges = _edges(columns, nodes, layers)
    return graph


def _edges(columns, nodes, layers) -> list[tuple[int, int, int, int, float]]:
    # Which displayed (column, row) writes each channel class.
    writers: dict[int, list[tuple[int, int]]] = {}
    edges = []
    for b, name in enumerate(columns):
        layer = layers[name]
        share = _weight_share(layer)  # (C_out, inputs)
        found = []
        for row_b, (o, r_o) in enumerate(nodes[b]):
            for cls in np.unique(layer.in_class[layer.in_class >= 0]).tolist():
                if cls not in writers:
                    continue
                w = r_o * float(share[o, layer.in_class == cls].sum())
                if w > 0:
                    found.extend((a, row_a, b, row_b, w) for a, row_a in writers[cls])
        if found:
            found.sort(key=lambda e: -e[4])
            strongest = found[0][4]
            edges.extend(
                (*e[:4], e[4] / strongest)
                for e in found[: _EDGES_PER_NODE * len(nodes[b])]
                if e[4] >= _MIN_EDGE * strongest
            )
        for row, (channel, _) in enumerate(nodes[b]):
            writers.setdefault(int(layer.out_class[channel]), []).append((b, row))
    return edges


def _weight_share(layer) -> np.ndarray:
    """(C_out, inputs): each input's part of an output channel's positive weight mass."""
    w = np.maximum(layer.weight.astype(np.float64), 0.0)
    if w.ndim > 2:
        w = w.reshape(w.shape[0], w.shape[1], -1).sum(2)
    group = int(layer.attrs.get("group", 1)) if layer.op == "Conv" else 1
    if group > 1:  # grouped Conv: each output reads its own block of inputs
        cout, cin_g = w.shape
        full = np.zeros((cout, cin_g * group))
        per = cout // group
        for g in range(group):
            full[g * per : (g + 1) * per, g * cin_g : (g + 1) * cin_g] = w[g * per : (g + 1) * per]
        w = full
    mass = w.sum(1, keepdims=True)
    return np.divide(w, mass, out=np.zeros_like(w), where=mass > 0)
