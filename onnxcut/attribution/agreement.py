"""Agreement of a sub-network with its original, label-free, and the smallest plan that
keeps a required agreement (`--min-agreement`).

For a classifier, agreement is the share of the images the original assigns to a chosen
category where the sub-network's argmax over the chosen categories names the same one. For
a segmenter given its `background`, every pixel counts and the reference is the original's
argmax over the chosen categories (background included): its prediction on the
category-customised task that `eval --classes` scores, where other categories are
background; without one, only the pixels the original assigns to a chosen category count.
A segmenter's agreement is the mean over categories of the IoU between the two maps: pixel
agreement let background dominate (0.95 of the pixels agreeing kept 0.47 of deeplab's mIoU
on digits {4, 6}), and mIoU is what a user keeps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
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
RESAMPLES = 1000  # bootstrap resamples of the images for a confidence bound


class AgreementCheck:
    """The original's predictions on a folder, computed once; calling it with a sub-network
    gives that sub-network's agreement (see module)."""

    def __init__(
        self,
        original: ModelProto | str | os.PathLike[str],
        images: str | os.PathLike[str],
        categories: Sequence[int],
        *,
        preprocess: data.Preprocess | None = None,
        provider: str = "cpu",
        threads: int | None = None,
        limit: int | None = None,
        background: int | None = None,
        category_axis: int | None = None,
    ):
        original = load(original)
        self.category_axis = category_axis  # None: axis 1 (find_head)
        head = find_head(original, axis=category_axis)
        # The original may itself be a sub-network: name its outputs by original category.
        names = np.array(output_categories(original, head) or range(head.n_categories))
        self.categories = list(categories)
        self.provider, self.threads = provider, threads
        pre = preprocess or data.fit_to_model(data.preprocess_from(original), original)
        sess = session(original, provider, threads)
        name = sess.get_inputs()[0].name
        self.inputs: list[np.ndarray] = []
        self.tops: list[np.ndarray] = []
        customised = background is not None and head.spatial
        if customised and background not in self.categories:
            raise DataError(f"background {background} is not among categories {categories}")
        absent = [c for c in self.categories if c not in names]
        if absent:
            raise DataError(f"the original does not output categories {absent}")
        chosen = np.array([int(np.flatnonzero(names == c)[0]) for c in self.categories])
        paths = data.list_images(images)[:limit]
        self.paths = frozenset(p.resolve() for p in paths)  # a refit must not see these
        for batch in data.batches(paths, pre, 1):
            (out,) = sess.run([head.output], {name: batch.inputs})
            self.inputs.append(batch.inputs)
            if customised:  # the original's prediction on the customised task
                top = np.take(out, chosen, axis=head.axis).argmax(axis=head.axis)
                self.tops.append(np.asarray(self.categories)[top])
            else:
                self.tops.append(names[out.argmax(axis=head.axis)])
        self.counted = [np.isin(top, self.categories) for top in self.tops]
        if not any(c.any() for c in self.counted):
            raise DataError(
                f"{images}: the original assigns no position to categories "
                f"{self.categories}; pass images that show them"
            )

    def __call__(self, sub: ModelProto | str | os.PathLike[str]) -> float:
        confusions, spatial = self._confusions(sub)
        return _score(confusions.sum(0), spatial)

    def lower_bound(self, sub: ModelProto | str | os.PathLike[str], confidence: float) -> float:
        """The agreement that `confidence` of resamples of the images (with replacement,
        seeded) reach or beat: how low it may be on other images like these. A classifier
        agreeing on 62 of 64 images (0.969) gets 0.9375 at 0.95."""
        confusions, spatial = self._confusions(sub)
        n = len(confusions)
        draws = np.random.default_rng(0).integers(0, n, (RESAMPLES, n))
        scores = [_score(confusions[d].sum(0), spatial) for d in draws]
        return float(np.quantile(scores, 1 - confidence))

    def _confusions(self, sub: ModelProto | str | os.PathLike[str]) -> tuple[np.ndarray, bool]:
        """(images, k, k) confusion matrices, original x sub over the counted positions,
        one an image (the bootstrap resamples images); and whether the head is spatial."""
        sub = load(sub)
        head = find_head(sub, axis=self.category_axis)
        cats = output_categories(sub, head) or list(range(head.n_categories))
        missing = sorted(set(self.categories) - set(cats))
        if missing:
            raise DataError(f"the sub-network does not output categories {missing}")
        positions = np.array([cats.index(c) for c in self.categories])
        sess = session(sub, self.provider, self.threads)
        name = sess.get_inputs()[0].name
        k = len(self.categories)
        cats_array = np.asarray(self.categories)
        order = np.argsort(cats_array, kind="stable")
        per_image = []
        for x, top, counted in zip(self.inputs, self.tops, self.counted, strict=True):
            (out,) = sess.run([head.output], {name: x})
            sub_top = np.take(out, positions, axis=head.axis).argmax(axis=head.axis)
            for n in range(len(x)):
                # Each counted position's category as its index in self.categories.
                original = order[np.searchsorted(cats_array[order], top[n][counted[n]])]
                confusion = np.zeros((k, k), np.int64)
                np.add.at(confusion, (original, sub_top[n][counted[n]]), 1)
                per_image.append(confusion)
        return np.stack(per_image), head.spatial


def _score(confusion: np.ndarray, spatial: bool) -> float:
    """Agreement from a confusion matrix: accuracy for a classifier, mean IoU over the
    categories the original shows for a segmenter."""
    if not spatial:
        return float(np.trace(confusion) / max(confusion.sum(), 1))
    hits = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = confusion.sum(1) > 0  # categories the original shows
    return float(np.mean(hits[present] / union[present])) if present.any() else 1.0


def agreement(
    sub: ModelProto | str | os.PathLike[str],
    original: ModelProto | str | os.PathLike[str],
    images: str | os.PathLike[str],
    categories: Sequence[int],
    **kw,
) -> float:
    """Share of the original's positions in `categories` where `sub` agrees (see module)."""
    return AgreementCheck(original, images, categories, **kw)(sub)


def guarded_plan(
    model: ModelProto,
    make_plan: Callable[..., dict],
    sel,
    check: AgreementCheck,
    min_agreement: float,
    *,
    allow_full: bool = False,
    cut: Callable[[ModelProto, dict], ModelProto] | None = None,
    confidence: float | None = 0.95,
) -> dict:
    """The plan at the smallest FLOPs budget whose sub-network agrees with `model` on at least
    `min_agreement` of `check`'s positions (bisection over the budget; `make_plan(sel,
    check=check)` plans, so a sensitivity allocation is measured once). `cut(model, plan)`
    makes the sub-network to measure (default `extract`; reconstruction refits it first).
    The agreement compared is its bootstrap lower bound at `confidence` over the images
    (`AgreementCheck.lower_bound`); None compares the agreement on these images alone, which
    flatters: 64 unlabeled digits agreeing 0.97 kept 0.90 of a classifier's top-1 on others."""
    from onnxcut.channels.surgery import extract

    cut = cut or extract

    if not 0 < min_agreement <= 1:
        raise DataError(f"--min-agreement {min_agreement}: a share, 0 < A <= 1")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise DataError(f"--confidence {confidence}: a probability, 0.5 <= C < 1")

    def agrees(sub: ModelProto) -> float:
        return check(sub) if confidence is None else check.lower_bound(sub, confidence)

    def measure(share: float) -> tuple[dict, float] | None:
        try:
            plan = make_plan(replace(sel, flops=share), check=check)
        except DataError as e:
            if "smallest reachable" in str(e):
                return None
            raise
        return plan, agrees(cut(model, plan))

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
        **({"confidence": confidence} if confidence is not None else {}),
    }
    return plan


def warn_if_attributed(images: str | os.PathLike[str], attributed: str | None) -> None:
    """Agreement measured on the attributed images flatters the sub-network: say so."""
    if attributed and _overlaps(Path(images), Path(attributed)):
        log.warning(
            "%s holds the images the scores were attributed on: the agreement is optimistic; "
            "pass held-out images",
            images,
        )


def chosen_categories(sel, task: str | None) -> list[int]:
    """The categories a plan keeps: the chosen ones, and background for segmentation."""
    if task == "segment" and sel.background is not None:
        return sorted({sel.background, *sel.classes})
    return list(sel.classes)


def background_of(sel, task: str | None) -> int | None:
    """The background category a segmentation plan keeps, None for classifiers."""
    return sel.background if task == "segment" else None


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents
