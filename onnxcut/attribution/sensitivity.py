"""Measured sensitivity of each prunable group: how much agreement with the original the
sub-network loses when that group alone is cut, and how much FLOPs (or parameters) that saves.

The papers' scores say which channels inside a layer matter; they do not say how many a
layer can lose: a small projection before the head can cost a quarter of the task for a few
percent of the FLOPs (docs/quality.md). So each group is cut alone to a few shares of its
channels (the best-ranked kept), the others whole, and scored by `AgreementCheck` on
held-out images; `budget.by_sensitivity` then spends the budget where it costs least.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from onnx import ModelProto

from onnxcut.attribution.budget import Counts, Groups, size_of

log = logging.getLogger(__name__)

FRACTIONS = (0.125, 0.25, 0.5, 0.75)


def measure_into(
    groups: Groups,
    model: ModelProto,
    plan_for: Callable[[Counts], dict],
    check: Callable[[ModelProto], float],
    measure: str,
) -> None:
    """Fill `groups.losses` and `groups.savings` (one extract and one check per point)."""
    from onnxcut.channels.surgery import extract

    full = dict(groups.sizes)
    total = size_of(model, measure)
    base = check(extract(model, plan_for(full)))
    groups.fractions = FRACTIONS
    for i, (gid, channels) in enumerate(groups.sizes.items()):
        losses = []
        for share in FRACTIONS:
            counts = {**full, gid: max(1, math.ceil(share * channels))}
            sub = extract(model, plan_for(counts))
            losses.append(max(base - check(sub), 0.0))
            if share == 0.5:
                groups.savings[gid] = 1.0 - size_of(sub, measure) / total
        groups.losses[gid] = np.array(losses)
        log.info("sensitivity %d/%d: group %d loses %s", i + 1, len(full), gid, losses)
