"""Kept counts that meet a FLOPs or parameter budget (a share of the original's).

Each prunable group's channels are scored by the selection criterion summed over the chosen
categories, and divided by the group's mean score, so 1.0 is an average channel of any layer.
One threshold over these normalised scores sets every group's count (at least one channel,
rounded as `round_to` asks); the threshold is bisected over the scores' own values until the
extracted sub-network's FLOPs (or parameters) are the largest that stay within the budget.
Which channels fill a count is the selection's ranking, as without a budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from onnx import ModelProto

from onnxcut.errors import DataError
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

MEASURES = ("flops", "params")
Counts = dict[int, int]


def check_share(name: str, share: float | None) -> None:
    if share is not None and not 0 < share <= 1:
        raise DataError(f"--{name} {share}: a budget is a share of the original, 0 < {name} <= 1")


def fit(
    model: ModelProto,
    normalised: Mapping[int, np.ndarray],
    plan_for: Callable[[Counts], dict],
    measure: str,
    share: float,
    *,
    min_keep: int = 1,
    round_to: int | None = None,
) -> tuple[dict, float]:
    """Return the plan (from `plan_for(counts)`) whose sub-network has the largest `measure`
    at most `share` of the original's, and the share it reached."""
    from onnxcut.channels.inspection import summarize
    from onnxcut.channels.surgery import extract

    def size(m: ModelProto) -> float | None:
        # A dynamic batch counts as 1, as inspect counts it.
        sized = ModelProto()
        sized.CopyFrom(m)
        if default_batch_inplace(sized):
            sized = infer_shapes(sized)
        return summarize(sized)[measure]

    total = size(model)
    if not total:
        raise DataError(f"the model's {measure} are unknown (a dynamic input?); pass --input-shape")
    cache: dict[float, tuple[dict, float]] = {}

    def at(threshold: float) -> tuple[dict, float]:
        if threshold not in cache:
            plan = plan_for(_counts(normalised, threshold, min_keep, round_to))
            cache[threshold] = (plan, size(extract(model, plan)) / total)
        return cache[threshold]

    values = np.unique(np.concatenate([v for v in normalised.values()] or [np.zeros(1)]))
    # Thresholds from keeping everything (lo) to keeping min_keep per group (past the top).
    thresholds = [float(v) for v in values] + [float(values[-1]) + 1.0]
    smallest = at(thresholds[-1])
    if smallest[1] > share:
        raise DataError(
            f"--{measure} {share}: the smallest reachable is {smallest[1]:.3f} of the "
            f"original (frozen groups and {min_keep} channel(s) per cut group); raise it"
        )
    lo, hi = 0, len(thresholds) - 1  # at(hi) fits; find the lowest threshold that fits
    if at(thresholds[lo])[1] <= share:
        return at(thresholds[lo])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(thresholds[mid])[1] <= share:
            hi = mid
        else:
            lo = mid
    return at(thresholds[hi])


def _counts(
    normalised: Mapping[int, np.ndarray], threshold: float, min_keep: int, round_to: int | None
) -> Counts:
    counts = {}
    for gid, scores in normalised.items():
        n = max(int((scores >= threshold).sum()), min_keep)
        if round_to and round_to > 1:
            n = -(-n // round_to) * round_to
        counts[gid] = min(n, len(scores))
    return counts


def normalise(vector: np.ndarray) -> np.ndarray:
    """A group's scores over their mean; a group with no signal scores 0 everywhere."""
    v = np.maximum(np.asarray(vector, np.float64), 0.0)
    mean = v.mean() if v.size else 0.0
    return v / mean if mean > 0 else np.zeros_like(v)
