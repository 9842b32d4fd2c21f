"""The numbers a report draws: per-layer similarity and divergence, plan rows, sizes, latency.

Vectors are the scores file's means per category (each image's vector sums to 1 over the
channels, so a mean does too). Two categories are alike in a layer when their vectors point
the same way: cosine similarity. A layer's divergence is 1 minus the mean cosine over pairs of
distinct categories that contributed images: 0 where every category uses the same channels,
towards 1 where each uses its own.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from onnxcut.attribution.scores import Scores
from onnxcut.channels.plan import Plan
from onnxcut.graph.io import copy_model

_WARMUP = 5  # runs per model before timing: the first ones pick kernels and allocate

# Trailing path parts that name an op rather than a layer.
_OP_PARTS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class LayerStats:
    name: str
    channels: int
    categories: np.ndarray  # (k,) the categories drawn, indices into the scores' categories
    vectors: dict[str, np.ndarray]  # kind -> (k, C) mean per drawn category
    similarity: dict[str, np.ndarray]  # kind -> (k, k) cosine, NaN for unseen categories
    divergence: dict[str, float]  # kind -> 1 - mean cosine over pairs of all seen categories


def _unit(vectors: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1; rows of unseen or all-zero categories stay zero."""
    v = np.asarray(vectors, np.float64)  # (K, C)
    norms = np.linalg.norm(v, axis=1)
    ok = seen & (norms > 0)
    return np.divide(v, norms[:, None], out=np.zeros_like(v), where=ok[:, None])


def cosine(vectors: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """(K, K) cosine similarity of the rows of `vectors`; NaN where a category was not seen."""
    unit = _unit(vectors, seen)
    ok = unit.any(axis=1)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    sim[~ok, :] = np.nan
    sim[:, ~ok] = np.nan
    return sim


def divergence(vectors: np.ndarray, seen: np.ndarray) -> float:
    """1 - mean cosine over pairs of distinct seen categories (NaN with fewer than two).

    The sum of cosines over ordered pairs i != j is |sum of unit rows|^2 - n, so 1000
    categories cost O(K C), not a (K, K) matrix.
    """
    unit = _unit(vectors, seen)
    n = int(unit.any(axis=1).sum())
    if n < 2:
        return math.nan
    total = unit.sum(axis=0)
    return float(1.0 - (total @ total - n) / (n * (n - 1)))


def shown_categories(scores: Scores, chosen: tuple[int, ...], limit: int) -> np.ndarray:
    """Categories the heat maps draw: all, or `chosen` then those with the most images."""
    k = len(scores.categories)
    if k <= limit:
        return np.arange(k)
    order = [c for c in chosen if 0 <= c < k]
    rest = np.argsort(-scores.count, kind="stable").tolist()
    order += [c for c in rest if c not in order]
    return np.sort(np.array(order[:limit]))


def layer_stats(
    scores: Scores,
    categories: np.ndarray | None = None,
    kinds: tuple[str, ...] = ("forward", "backward"),
) -> list[LayerStats]:
    """One LayerStats per probed layer, in the scores file's (graph) order."""
    seen = scores.count > 0
    cats = np.arange(len(scores.categories)) if categories is None else np.asarray(categories)
    present = [k for k in kinds if scores.layers(k)]
    out = []
    for name in scores.layers("forward"):
        means = {k: scores.mean(k, name) for k in present if f"{k}/{name}" in scores.arrays}
        out.append(
            LayerStats(
                name,
                means["forward"].shape[1],
                cats,
                {k: v[cats] for k, v in means.items()},
                {k: cosine(v[cats], seen[cats]) for k, v in means.items()},
                {k: divergence(v, seen) for k, v in means.items()},
            )
        )
    return out


def shown_channels(vectors: list[np.ndarray], limit: int) -> np.ndarray:
    """Channels a heat map shows: all, or the `limit` with the highest peak, in index order.

    A peak is the largest mean over categories relative to an even spread (value x C), the
    largest over the given kinds; a layer of 2048 channels drawn at 1280 px would blur.
    """
    c = vectors[0].shape[1]
    if c <= limit:
        return np.arange(c)
    peak = np.max([np.nanmax(v, axis=0) for v in vectors], axis=0)  # (C,)
    return np.sort(np.argsort(-peak, kind="stable")[:limit])


def short_names(names: list[str]) -> list[str]:
    """Compact layer labels: exporter paths without repeated parts and op suffixes.

    `/backbone/backbone.1/conv1/conv1.0/Conv` becomes `backbone.1/conv1.0`; the full names
    come back when two compact ones would collide.
    """
    out = []
    for name in names:
        parts = [p for p in name.strip("/").split("/") if p]
        if len(parts) > 1 and parts[-1] in _OP_PARTS:
            parts = parts[:-1]
        following = [*parts[1:], ""]
        kept = [p for p, nxt in zip(parts, following, strict=True) if not nxt.startswith(f"{p}.")]
        out.append("/".join(kept) or name)
    return out if len(set(out)) == len(out) else list(names)


@dataclass
class PlanRow:
    layer: str
    group: int | None
    kept: int
    total: int
    frozen: str | None = None  # why the group may not be cut
    head: bool = False  # its channels reach a graph output (cut through `outputs`)


def plan_rows(plan: Plan, model: ModelProto, model_sha256: str | None) -> list[PlanRow]:
    """Kept and total channels of every parameter layer under a plan, checked on the model."""
    from onnxcut.channels.deps import trace
    from onnxcut.channels.plan import resolve

    channels = trace(model)
    kept = resolve(plan, channels, model_sha256)  # (classes,) bool; PlanError if it misfits
    rows = []
    for name, slots in channels.producer_slots.items():
        group = channels.group_of(name)
        classes = channels.slot_class[slots]
        rows.append(
            PlanRow(
                name,
                group.id,
                int(kept[classes].sum()),
                len(slots),
                group.reason,
                bool(group.outputs),
            )
        )
    return rows


def plan_rows_from_scores(plan: Plan, scores: Scores) -> list[PlanRow]:
    """Without the model: the probed layers' widths, kept counts as the plan names them."""
    rows = []
    for name in scores.layers("forward"):
        total = scores.get("forward", name).shape[1]
        rows.append(PlanRow(name, None, len(plan.keep.get(name, range(total))), total))
    return rows


def size(model: ModelProto) -> dict[str, int | None]:
    """Parameters and FLOPs (MACs) as `onnxcut inspect` counts them (a dynamic batch is 1)."""
    from onnxcut.channels.inspection import count_params, layers
    from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

    model = copy_model(model)
    if default_batch_inplace(model):
        infer_shapes(model)
    table = layers(model)
    if any(row["flops"] is None for row in table):
        from onnxcut.graph.folding import fold_shape_values

        table = layers(fold_shape_values(model))
    flops = [row["flops"] for row in table]
    return {"params": count_params(model), "flops": None if None in flops else sum(flops)}


def latency_ms(models: list[ModelProto], runs: int = 20, threads: int | None = None) -> list[float]:
    """Median onnxruntime CPU latency of `runs` batch-1 runs of each model, on random input.

    The models take turns run by run, so a machine busy with other work slows all alike.
    """
    from onnxcut import data
    from onnxcut.runtime import session

    pre = data.fit_to_model(data.preprocess_from(models[0]), models[0])
    shape = [1, pre.n_channels, *pre.size] if pre.layout == "nchw" else [1, *pre.size, 3]
    if pre.layout != "nchw":
        shape[3] = pre.n_channels
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    sessions = [session(m, "cpu", threads) for m in models]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs + _WARMUP):
        for sess, feed, out in zip(sessions, feeds, times, strict=True):
            t0 = time.perf_counter()
            sess.run(None, feed)
            if i >= _WARMUP:
                out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]
