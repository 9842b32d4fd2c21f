"""Kept counts that meet a FLOPs or parameter budget (a share of the original's).

An allocation maps one knob t in [0, 1] to every prunable group's kept count, from keeping
everything (t = 0) to keeping `min_keep` channels a group (t = 1); `fit` bisects t until the
extracted sub-network has the largest FLOPs (or parameters) within the budget. Which channels
fill a count stays the selection's ranking. The allocations, one entry each in ALLOCATIONS:

    uniform      every group keeps the same share of its channels
    scores       one threshold over the criterion's scores, each group's divided by its mean
                 (1.0 is an average channel of any layer)
    sensitivity  each group's measured loss of agreement when cut alone (`sensitivity.py`)
                 traded against the FLOPs it saves: the knob sets the exchange rate, and each
                 group keeps the share that minimises loss - rate * saving
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from onnx import ModelProto

from onnxcut.errors import DataError
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

MEASURES = ("flops", "params")
STEPS = 24  # bisection steps on the knob
SHARES = np.linspace(1 / 16, 1.0, 16)  # the shares a sensitivity allocation picks from
Counts = dict[int, int]


@dataclass
class Groups:
    """What an allocation knows of the prunable groups, by group id."""

    sizes: dict[int, int]  # channels
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # criterion totals, (C,)
    # sensitivity: loss of agreement at each of `fractions` when the group alone is cut,
    # and the share of the measure saved by cutting it alone to half
    fractions: tuple[float, ...] = ()
    losses: dict[int, np.ndarray] = field(default_factory=dict)
    savings: dict[int, float] = field(default_factory=dict)


def check_share(name: str, share: float | None) -> None:
    if share is not None and not 0 < share <= 1:
        raise DataError(f"--{name} {share}: a budget is a share of the original, 0 < {name} <= 1")


def size_of(model: ModelProto, measure: str) -> float | None:
    """FLOPs (MACs) or parameters of a model; a dynamic batch counts as 1, as in inspect."""
    from onnxcut.channels.inspection import summarize

    sized = ModelProto()
    sized.CopyFrom(model)
    if default_batch_inplace(sized):
        sized = infer_shapes(sized)
    return summarize(sized)[measure]


def fit(
    model: ModelProto,
    shares_at: Callable[[float], dict[int, float]],
    sizes: Mapping[int, int],
    plan_for: Callable[[Counts], dict],
    measure: str,
    share: float,
    *,
    min_keep: int = 1,
    round_to: int | None = None,
) -> tuple[dict, float]:
    """Return the plan whose sub-network has the largest `measure` at most `share` of the
    original's, and the share it reached; `shares_at(t)` gives each group's kept share."""
    from onnxcut.channels.surgery import extract

    total = size_of(model, measure)
    if not total:
        raise DataError(f"the model's {measure} are unknown (a dynamic input?); pass --input-shape")
    cache: dict[tuple, tuple[dict, float]] = {}

    def at(t: float) -> tuple[dict, float]:
        counts = counts_for(shares_at(t), sizes, min_keep, round_to)
        key = tuple(sorted(counts.items()))
        if key not in cache:
            plan = plan_for(counts)
            cache[key] = (plan, size_of(extract(model, plan), measure) / total)
        return cache[key]

    smallest = at(1.0)
    if smallest[1] > share:
        raise DataError(
            f"--{measure} {share}: the smallest reachable is {smallest[1]:.3f} of the "
            f"original (frozen groups and {min_keep} channel(s) per cut group); raise it"
        )
    if at(0.0)[1] <= share:
        return at(0.0)
    lo, hi = 0.0, 1.0  # at(hi) fits, at(lo) does not
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        if at(mid)[1] <= share:
            hi = mid
        else:
            lo = mid
    # One knob step can move many groups at once: blend the counts of the two ends, each
    # group a fraction u of the way from the fitting plan to the one just over budget.
    fits = counts_for(shares_at(hi), sizes, min_keep, round_to)
    over = counts_for(shares_at(lo), sizes, min_keep, round_to)
    step = round_to or 1

    def blend(u: float) -> Counts:
        return {
            g: min(sizes[g], fits[g] + step * round(u * (over[g] - fits[g]) / step)) for g in fits
        }

    best, counts = at(hi), fits
    lo_u, hi_u = 0.0, 1.0  # blend(lo_u) fits, blend(hi_u) does not
    for _ in range(12):
        mid = (lo_u + hi_u) / 2
        trial = blend(mid)
        plan = plan_for(trial)
        reached = size_of(extract(model, plan), measure) / total
        if reached <= share:
            lo_u, best, counts = mid, (plan, reached), trial
        else:
            hi_u = mid
    return _fill(model, counts, sizes, plan_for, measure, share, total, step, best)


def _fill(model, counts, sizes, plan_for, measure, share, total, step, best) -> tuple[dict, float]:
    """Grow the most-cut groups a step at a time while the budget holds: one knob moves
    every group at once, and can stop a few percent short of the budget."""
    from onnxcut.channels.surgery import extract

    counts = dict(counts)
    tries = 3 * len(counts)  # extracts: bounded, as large models extract slowly
    while tries > 0:
        grown = False
        for gid in sorted(counts, key=lambda g: counts[g] / sizes[g]):
            if counts[gid] >= sizes[gid]:
                continue
            if tries == 0:
                break
            tries -= 1
            trial = {**counts, gid: min(counts[gid] + step, sizes[gid])}
            plan = plan_for(trial)
            reached = size_of(extract(model, plan), measure) / total
            if reached <= share:
                counts, best, grown = trial, (plan, reached), True
                break
        if not grown:
            break
    return best


def counts_for(
    shares: Mapping[int, float], sizes: Mapping[int, int], min_keep: int, round_to: int | None
) -> Counts:
    counts = {}
    for gid, share in shares.items():
        n = max(int(np.ceil(share * sizes[gid] - 1e-9)), min_keep)
        if round_to and round_to > 1:
            # Runtimes' blocked kernels run fastest on channel counts in multiples of 8/16.
            n = -(-n // round_to) * round_to
        counts[gid] = min(n, sizes[gid])
    return counts


def uniform(groups: Groups) -> Callable[[float], dict[int, float]]:
    return lambda t: {gid: 1.0 - t for gid in groups.sizes}


def by_scores(groups: Groups) -> Callable[[float], dict[int, float]]:
    normalised = {gid: normalise(v) for gid, v in groups.scores.items()}
    pooled = np.sort(np.concatenate([*normalised.values(), np.zeros(0)]))

    def shares(t: float) -> dict[int, float]:
        if t >= 1.0 or not len(pooled):
            return {gid: 0.0 for gid in groups.sizes}
        threshold = pooled[int(t * len(pooled))]
        return {
            gid: float((v >= threshold).sum()) / len(v) if len(v) else 1.0
            for gid, v in normalised.items()
        }

    return shares


def by_sensitivity(groups: Groups) -> Callable[[float], dict[int, float]]:
    if not groups.losses:
        raise DataError("the sensitivity allocation needs measured losses; pass --data DIR")
    xs = np.array([0.0, *groups.fractions, 1.0])
    curves = {}
    for gid, losses in groups.losses.items():
        # No channel left loses at least what the smallest measured share lost.
        ys = np.array([losses[0], *losses, 0.0])
        curves[gid] = np.interp(SHARES, xs, ys)
    savings = {gid: max(groups.savings.get(gid, 0.0), 1e-9) for gid in groups.losses}
    typical = max(float(np.median([c.max() for c in curves.values()])), 1e-3)
    # A small convex penalty on the share cut: groups whose measured loss is flat (zero
    # where nothing was lost) are then cut gradually as the rate rises, not all at once.
    for gid in curves:
        curves[gid] = curves[gid] + 0.05 * typical * (1.0 - SHARES) ** 2
    # The exchange rate's scale: a typical loss per typical saving.
    scale = typical / float(np.median(list(savings.values())))

    def shares(t: float) -> dict[int, float]:
        if t >= 1.0:
            return {gid: 0.0 for gid in groups.sizes}
        rate = scale * t / (1.0 - t)
        out = {}
        for gid in groups.sizes:
            if gid not in curves:
                out[gid] = 1.0
                continue
            # Cutting to share s saves about 2 (1 - s) times the saving at one half.
            cost = curves[gid] - rate * 2.0 * (1.0 - SHARES) * savings[gid]
            # Ties go to the larger share: argmin over the reversed costs.
            out[gid] = float(SHARES[len(SHARES) - 1 - int(np.argmin(cost[::-1]))])
        return out

    return shares


ALLOCATIONS: dict[str, Callable[[Groups], Callable[[float], dict[int, float]]]] = {
    "uniform": uniform,
    "scores": by_scores,
    "sensitivity": by_sensitivity,
}


def normalise(vector: np.ndarray) -> np.ndarray:
    """A group's scores over their mean; a group with no signal scores 0 everywhere."""
    v = np.maximum(np.asarray(vector, np.float64), 0.0)
    mean = v.mean() if v.size else 0.0
    return v / mean if mean > 0 else np.zeros_like(v)
