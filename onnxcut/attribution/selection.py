"""From scores to a plan: the channels each chosen category needs, united over categories.

For category k and layer L, the forward vector f (mean over images of each image's masked
activation sums, normalised) and the backward vector b (likewise for the positive gradients)
each rank the channels. A channel "ranks high" in a vector when it belongs to the smallest set
of top channels that holds `alpha` (for f) or `beta` (for b) of the vector's mass. Category k
keeps the channels that rank high in both; the layer keeps the union over the chosen
categories (for segmentation, background included: the head keeps it). Coupled producers
(one channel group) keep the union of their kept sets.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from onnx import ModelProto

from onnxcut.attribution import budget, sensitivity
from onnxcut.attribution.scores import Scores
from onnxcut.errors import DataError

PLAN_FORMAT = "onnxcut.plan/1"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    classes: tuple[int, ...]
    alpha: float = 0.9
    beta: float = 0.9
    layers: str | None = None  # None (all scored), "last:N", or comma-separated node names
    min_keep: int | None = None  # pad small keep-sets to this size instead of failing
    background: int | None = 0  # segmentation head channel kept besides the classes
    criterion: str = "disassembler"  # a key of CRITERIA
    round_to: int | None = None  # round each group's kept count up to a multiple of this
    rank: str = "scores"  # which channels fill a group's count: by the scores, or "l1"
    keep_head: bool = False  # keep every category of the head (the original's probabilities)
    flops: float | None = None  # keep at most this share of the FLOPs (replaces alpha/beta)
    params: float | None = None  # keep at most this share of the parameters
    # how a budget is spread over groups: a key of budget.ALLOCATIONS; None picks
    # sensitivity where images to measure it on are given, else uniform
    allocate: str | None = None


def parse_classes(text: str | Sequence[int | str], categories: Sequence[str]) -> tuple[int, ...]:
    """Turn `4,8` (indices or category names) into sorted unique indices, checked."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        item = str(item).strip()
        if item in categories and not item.isdigit():
            out.append(categories.index(item))
            continue
        try:
            k = int(item)
        except ValueError:
            raise DataError(
                f"--classes '{item}': not an index or a category name "
                f"({', '.join(categories[:12])}...)"
            ) from None
        if not 0 <= k < len(categories):
            raise DataError(
                f"--classes {k} is out of range: the model has {len(categories)} "
                f"categories (0..{len(categories) - 1})"
            )
        out.append(k)
    if not out:
        raise DataError("--classes is empty; name at least one category, e.g. --classes 4,8")
    return tuple(sorted(set(out)))


def mass_set(vector: np.ndarray, share: float) -> np.ndarray:
    """Boolean mask of the fewest top entries holding `share` of the vector's mass."""
    v = np.maximum(np.asarray(vector, np.float64), 0.0)
    total = v.sum()
    keep = np.zeros(v.shape, bool)
    if total <= 0 or share <= 0:
        return keep
    order = np.argsort(-v, kind="stable")
    needed = int(np.searchsorted(np.cumsum(v[order]), share * total * (1 - 1e-12))) + 1
    keep[order[:needed]] = True
    return keep


# criterion -> the score kinds whose mass sets a channel must be in (alpha for the first,
# beta for the second). "forward" and "backward" alone are the papers' ablations.
CRITERIA: dict[str, tuple[str, ...]] = {
    "disassembler": ("forward", "backward"),
    "forward": ("forward",),
    "backward": ("backward",),
    "taylor": ("taylor",),
    "relevance": ("relevance",),  # Model LEGO routes (classify scores only)
}


def select_layer(scores: Scores, layer: str, sel: Selection) -> np.ndarray:
    """Channels (bool, (C,)) that layer `layer` keeps for the chosen categories."""
    kinds = CRITERIA[sel.criterion]
    means = [scores.mean(kind, layer) for kind in kinds]  # each (K, C)
    keep = np.zeros(means[0].shape[1], bool)
    for k in sel.classes:
        mine = np.ones_like(keep)
        for mean, share in zip(means, (sel.alpha, sel.beta), strict=False):
            mine &= mass_set(mean[k], share)
        keep |= mine
    return keep


def _layer_scores(scores: Scores, layer: str, sel: Selection) -> np.ndarray:
    """The criterion's score kinds summed over the chosen categories, (C,)."""
    return sum(
        scores.mean(kind, layer)[list(sel.classes)].sum(0) for kind in CRITERIA[sel.criterion]
    )


def _ranking(scores: Scores, layer: str, sel: Selection) -> np.ndarray:
    return np.argsort(-_layer_scores(scores, layer, sel), kind="stable")


def filter_l1(channels) -> dict[str, np.ndarray]:
    """L1 norm of each producer's filters per output channel, (C,) by producer name."""
    index, out = channels.index, {}
    for name in channels.producer_slots:
        node = index.nodes[name]
        w = index.const(node.input[1]) if len(node.input) > 1 else None
        if w is None or node.op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        w = np.abs(w.astype(np.float64))
        if node.op_type == "ConvTranspose":
            w = np.moveaxis(w, 1, 0)  # (Cin, Cout/g, ...) -> (Cout, Cin, ...); group 1 only
        elif node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        out[name] = w.reshape(w.shape[0], -1).sum(1)
    return out


def _pad(kept: np.ndarray, order: np.ndarray, count: int) -> np.ndarray:
    """Add the best-ranked channels not yet kept until `count` are kept."""
    kept = kept.copy()
    for c in order:
        if kept.sum() >= count:
            break
        kept[c] = True
    return kept


def _equal_blocks(groups, final: dict[int, np.ndarray], owner: dict[int, str], orders) -> None:
    """Grouped convolutions need the same kept count in each of their blocks: top up the
    short blocks with their best-ranked channels, until every constraint holds.

    `final` maps a group to its kept mask over its owner layer's output positions; a
    constraint whose channels span several groups keeps those groups whole.
    """
    position = {}  # class -> (group, position in the owner's output)
    for gid, layer in owner.items():
        for p, slot in enumerate(groups.producer_slots[layer].tolist()):
            position.setdefault(int(groups.slot_class[slot]), (gid, p))
    changed = True
    while changed:
        changed = False
        for slots, n in groups.blocks:
            classes = groups.slot_class[slots]
            cut = [position[c] for c in classes.tolist() if c in position]
            gids = {g for g, _ in cut}
            if not gids or not any(not final[g].all() for g in gids):
                continue
            if len(gids) > 1 or len(cut) != len(classes):
                for g in gids:
                    changed |= not final[g].all()
                    final[g][:] = True
                continue
            (gid,) = gids
            blocks = np.array([p for _, p in cut]).reshape(n, -1)
            counts = final[gid][blocks].sum(axis=1)
            if len(set(counts.tolist())) == 1:
                continue
            rank = np.empty(len(final[gid]), np.int64)
            rank[orders[gid]] = np.arange(len(orders[gid]))
            for block, count in zip(blocks, counts, strict=True):
                missing = [
                    p for p in sorted(block.tolist(), key=rank.__getitem__) if not final[gid][p]
                ]
                final[gid][missing[: int(counts.max() - count)]] = True
            changed = True


def _selectable(groups, group, layer: str) -> bool:
    """Whether a plan may name `layer` for its group: its channels must be the group's
    classes one to one. A channel shuffle couples several channels of one producer into one
    class; such groups stay whole here (a hand-written plan can still cut them exactly), as
    a kept set chosen per channel could leave one of the shuffle's tensors empty."""
    slots = groups.producer_slots[layer]
    if len(slots) != group.channels:
        return False  # e.g. the narrower input of a Pad-widened residual: another names it
    for producer in group.producers:
        classes = groups.slot_class[groups.producer_slots[producer]]
        if len(np.unique(classes)) < len(classes):
            log.info("group of '%s' is coupled by a channel shuffle: kept whole", layer)
            return False
    return True


def _chosen_layers(scores: Scores, spec: str | None) -> list[str]:
    layers = scores.layers("forward")
    if not spec:
        return layers
    if spec.startswith("last:"):
        try:
            n = int(spec[5:])
        except ValueError:
            n = 0
        if n <= 0:
            raise DataError(f"--layers '{spec}': expected last:N with N >= 1")
        return layers[-n:]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise DataError(
            f"--layers: {', '.join(unknown)} not in the scores file; scored layers: "
            f"{', '.join(layers[:6])}..."
        )
    return names


def _check_channels(scores: Scores, layer: str, channels: int) -> None:
    for key, array in scores.arrays.items():
        if key.split("/", 1)[1] == layer and array.shape[1] != channels:
            raise DataError(
                f"scores '{key}' cover {array.shape[1]} channels, layer '{layer}' has "
                f"{channels}; the scores were made for another model, re-run attribute"
            )


def make_plan(
    model: ModelProto, scores: Scores, sel: Selection, *, check: Callable | None = None
) -> dict:
    """Return the plan JSON (onnxcut.plan/1) for the chosen categories.

    `check` (an `agreement.AgreementCheck` on held-out images) lets a budget be allocated by
    measured sensitivity; its measurements are kept on it for later plans.
    """
    from onnxcut.channels.deps import trace

    if sel.rank not in ("scores", "l1"):
        raise DataError(f"--rank '{sel.rank}': use scores or l1")
    if sel.criterion not in CRITERIA:
        raise DataError(f"--criterion '{sel.criterion}': use one of {', '.join(CRITERIA)}")
    missing = [kind for kind in CRITERIA[sel.criterion] if not scores.layers(kind)]
    if missing:
        why = (
            "relevance routes come from classifier runs"
            if missing[0] == "relevance"
            else "made by an older onnxcut: re-run attribute"
        )
        raise DataError(
            f"the scores file has no {missing[0]} scores ({why}); pick another --criterion"
        )
    budget.check_share("flops", sel.flops)
    budget.check_share("params", sel.params)
    if any(p.key == "onnxcut.assembly" for p in model.metadata_props):
        # Only the first part has a background logit: the others' cut is not guided by
        # what keeps their logits low on background (docs/assemble.md measures the loss).
        log.warning(
            "planning a cut of an assembled model: parts after the first lose their "
            "background; refit with extract --reconstruct, or cut each part before assembling"
        )
    if sel.flops is not None and sel.params is not None:
        raise DataError("--flops and --params: give one budget")
    for name, value in (("alpha", sel.alpha), ("beta", sel.beta)):
        if not 0 < value <= 1:
            raise DataError(
                f"--{name} {value} keeps nothing or is not a share; use 0 < {name} <= 1"
            )
    unseen = [scores.categories[k] for k in sel.classes if scores.count[k] == 0]
    if unseen:
        raise DataError(
            f"categor{'y' if len(unseen) == 1 else 'ies'} {', '.join(unseen)} never "
            "reached the confidence threshold in any image; lower --tau or add "
            "images showing it"
        )
    if scores.meta.get("task") == "segment" and sel.background is not None:
        if not 0 <= sel.background < len(scores.categories):
            raise DataError(
                f"--background {sel.background} is out of range (0..{len(scores.categories) - 1})"
            )
        # The head keeps the background channel, so its kernels must stay too.
        sel = replace(sel, classes=tuple(sorted({sel.background, *sel.classes})))
    groups = trace(model)
    keep_by_group: dict[int, np.ndarray] = {}
    owner: dict[int, str] = {}
    for layer in _chosen_layers(scores, sel.layers):
        if layer not in groups.producer_slots:
            continue
        _check_channels(scores, layer, len(groups.producer_slots[layer]))
        group = groups.group_of(layer)
        if not group.prunable or not _selectable(groups, group, layer):
            continue
        kept = select_layer(scores, layer, sel)
        if group.id in keep_by_group and keep_by_group[group.id].shape == kept.shape:
            kept = kept | keep_by_group[group.id]
        keep_by_group[group.id], owner[group.id] = kept, owner.get(group.id, layer)
    output = scores.meta.get("output")
    if output and output not in groups.maps:
        # A Softmax (or another mixing op) after the logits: cutting categories would change
        # the kept ones' values, so the head keeps every category.
        log.warning(
            "output '%s' mixes its categories (a Softmax after the logits?): the head keeps "
            "all of them; only the layers before it are cut",
            output,
        )
    l1 = filter_l1(groups) if sel.rank == "l1" else {}
    orders: dict[int, np.ndarray] = {}
    for gid, layer in owner.items():
        if sel.rank == "l1":
            # The scores set how many channels the group keeps; the filters' L1 norms which.
            norms = sum(l1[p] for p in groups.groups[gid].producers if p in l1)
            orders[gid] = np.argsort(-norms, kind="stable")
        else:
            orders[gid] = _ranking(scores, layer, sel)
    measure = "flops" if sel.flops is not None else "params" if sel.params is not None else None

    def plan_for(counts: dict[int, int]) -> dict:
        final = {}
        for gid, kept in keep_by_group.items():
            if sel.rank == "l1" or measure is not None:
                kept = np.zeros_like(kept)
                kept[orders[gid][: counts[gid]]] = True
            else:
                kept = _pad(kept, orders[gid], counts[gid])
            final[gid] = kept
        _equal_blocks(groups, final, owner, orders)
        keep = {owner[gid]: [int(c) for c in np.flatnonzero(k)] for gid, k in final.items()}
        return _plan_dict(scores, groups, sel, keep)

    if measure is not None:
        return _budget_plan(model, scores, sel, keep_by_group, owner, plan_for, measure, check)
    counts = {}
    for gid, kept in keep_by_group.items():
        layer = owner[gid]
        if kept.sum() < (sel.min_keep or 1) and sel.min_keep is None:
            backward = scores.arrays.get(f"backward/{layer}")
            if backward is not None and not backward[list(sel.classes)].any():
                raise DataError(
                    f"layer '{layer}': no gradient reaches it from the chosen categories, so it "
                    "does not feed them (a part of an assembly that gives none of them?); "
                    "assemble again from the parts that give the categories you want"
                )
            raise DataError(
                f"layer '{layer}': alpha={sel.alpha}, beta={sel.beta} keep no channel; "
                "raise --alpha/--beta or pass --min-keep N"
            )
        target = max(int(kept.sum()), sel.min_keep or 1)
        if sel.round_to and sel.round_to > 1:
            # Runtimes' blocked kernels run fastest on channel counts in multiples of 8/16.
            target = -(-target // sel.round_to) * sel.round_to
        counts[gid] = min(target, kept.size)
    return plan_for(counts)


def _budget_plan(model, scores, sel, keep_by_group, owner, plan_for, measure, check) -> dict:
    """The plan meeting `sel`'s FLOPs or parameter budget (see budget.py)."""
    allocation = sel.allocate or ("sensitivity" if check is not None else "uniform")
    if allocation not in budget.ALLOCATIONS:
        raise DataError(f"--allocate '{allocation}': use {', '.join(budget.ALLOCATIONS)}")
    info = budget.Groups(
        {gid: len(kept) for gid, kept in keep_by_group.items()},
        {gid: _layer_scores(scores, owner[gid], sel) for gid in keep_by_group},
    )
    if allocation == "sensitivity":
        if check is None:
            raise DataError("--allocate sensitivity measures on images: pass --data DIR")
        key = (sel.classes, sel.criterion, sel.rank, sel.layers, measure)
        cache = check.__dict__.setdefault("sensitivity", {})
        if key not in cache:
            sensitivity.measure_into(info, model, plan_for, check, measure)
            cache[key] = info
        info = cache[key]
    share = sel.flops if measure == "flops" else sel.params
    plan, reached = budget.fit(
        model,
        budget.ALLOCATIONS[allocation](info),
        info.sizes,
        plan_for,
        measure,
        share,
        min_keep=sel.min_keep or 1,
        round_to=sel.round_to,
    )
    plan["selection"] = {
        measure: share,
        f"{measure}_reached": round(reached, 6),
        "allocation": allocation,
    }
    return plan


def _plan_dict(scores: Scores, groups, sel: Selection, plan_keep: dict) -> dict:
    plan = {
        "format": PLAN_FORMAT,
        "model_sha256": scores.meta.get("model_sha256"),
        "keep": plan_keep,
        "outputs": {},
    }
    output, axis = scores.meta.get("output"), scores.meta.get("category_axis", 1)
    if output and output in groups.maps and not sel.keep_head:
        plan["outputs"][output] = {"axis": axis, "keep": list(sel.classes)}
    return plan
