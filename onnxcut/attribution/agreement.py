"""Agreement of a sub-network with its original, label-free, and the smallest plan that
keeps a required agreement (`--min-agreement`).

Agreement counts the positions (pixels, or images for classifiers) that the original assigns
to one of the chosen categories (background included for segmentation): the share of them
where the sub-network's argmax over those categories names the same category.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from onnx import ModelProto

from onnxcut import data
from onnxcut.attribution.probe import find_head, output_categories
from onnxcut.errors import DataError
from onnxcut.graph.io import load
from onnxcut.runtime import session

log = logging.getLogger(__name__)

BISECTIONS = 7  # the budget found is within 1/128 of the smallest that agrees


def agreement(
    sub: ModelProto | str | os.PathLike[str],
    original: ModelProto | str | os.PathLike[str],
    images: str | os.PathLike[str],
    categories: Sequence[int],
    *,
    preprocess: data.Preprocess | None = None,
    provider: str = "cpu",
    threads: int | None = None,
) -> float:
    """Share of the original's positions in `categories` where `sub` agrees (see module)."""
    sub, original = load(sub), load(original)
    sh, oh = find_head(sub), find_head(original)
    sub_cats = output_categories(sub, sh) or list(range(sh.n_categories))
    # The original may itself be a sub-network: name its outputs by original category too.
    original_cats = np.array(output_categories(original, oh) or range(oh.n_categories))
    chosen = [c for c in categories if c in sub_cats]
    if len(chosen) != len(categories):
        missing = sorted(set(categories) - set(sub_cats))
        raise DataError(f"the sub-network does not output categories {missing}")
    sub_pos = np.array([sub_cats.index(c) for c in chosen])
    wanted = np.array(chosen)
    pre = preprocess or data.fit_to_model(data.preprocess_from(original), original)
    ss, os_ = session(sub, provider, threads), session(original, provider, threads)
    si, oi = ss.get_inputs()[0].name, os_.get_inputs()[0].name
    same = total = 0
    for batch in data.batches(data.list_images(images), pre, 1):
        (so,) = ss.run([sh.output], {si: batch.inputs})
        (oo,) = os_.run([oh.output], {oi: batch.inputs})
        original_top = original_cats[oo.argmax(axis=oh.axis)]
        counted = np.isin(original_top, wanted)
        sub_top = wanted[np.take(so, sub_pos, axis=sh.axis).argmax(axis=sh.axis)]
        same += int((counted & (sub_top == original_top)).sum())
        total += int(counted.sum())
    if total == 0:
        raise DataError(
            f"{images}: the original assigns no position to categories {list(categories)}; "
            "pass images that show them"
        )
    return same / total


def guarded_plan(
    model: ModelProto,
    make_plan,
    sel,
    images: str | os.PathLike[str],
    min_agreement: float,
    *,
    allow_full: bool = False,
    attributed: str | None = None,
    preprocess: data.Preprocess | None = None,
    threads: int | None = None,
) -> dict:
    """The plan at the smallest FLOPs budget whose sub-network agrees with `model` on at least
    `min_agreement` of the positions (bisection over the budget; `make_plan(sel)` plans)."""
    from onnxcut.channels.surgery import extract

    if not 0 < min_agreement <= 1:
        raise DataError(f"--min-agreement {min_agreement}: a share, 0 < A <= 1")
    if attributed and _overlaps(Path(images), Path(attributed)):
        log.warning(
            "%s holds the images the scores were attributed on: the agreement is optimistic; "
            "pass held-out images",
            images,
        )
    categories = list(sel.classes)
    if sel.background is not None and sel.background not in categories:
        categories = sorted({sel.background, *categories})

    def measure(share: float) -> tuple[dict, float] | None:
        try:
            plan = make_plan(replace(sel, flops=share))
        except DataError as e:
            if "smallest reachable" in str(e):
                return None
            raise
        sub = extract(model, plan)
        return plan, agreement(
            sub, model, images, categories, preprocess=preprocess, threads=threads
        )

    full = measure(1.0)
    assert full is not None  # a budget of 1 keeps every channel
    found = None  # the smallest budget below 1 that agrees
    lo, hi = 0.0, 1.0
    for _ in range(BISECTIONS if full[1] >= min_agreement else 0):
        mid = (lo + hi) / 2
        got = measure(mid)
        if got is not None and got[1] >= min_agreement:
            hi, found = mid, got
        else:
            lo = mid
    if found is None:
        if not allow_full:
            raise DataError(
                f"no sub-network reaches agreement {min_agreement} short of the whole model "
                f"(the whole model, its head cut, agrees on {full[1]:.4f}); lower "
                "--min-agreement, or pass --allow-full to keep every channel"
            )
        found = full
    plan, reached = found
    plan["selection"] = {
        **plan.get("selection", {}),
        "min_agreement": min_agreement,
        "agreement": round(reached, 6),
    }
    return plan


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents
