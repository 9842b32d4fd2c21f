"""Why category sub-networks lose quality: per-layer and per-channel sensitivity, other rules.

For one model and digit subset (default deeplab_digits, the 2-digit subset of quality.py):

    layers     cut one planned layer at a time to the plan's count: the plan's channels,
               l1 and random
    budgets    other per-group counts (the same share of every group; the plan's counts
               rounded up to a multiple of 8), each ranked by several scores
    rules      other keep-set rules from the same mass sets (union of forward and backward
               instead of intersection; background left out of the selection), and the
               Disassembler on a log-softmax objective instead of the raw logit
    channels   remove single channels of the most sensitive layers and rank-correlate the
               metric lost with each score (which score predicts real damage)
    allocations  per-layer kept counts of the default plan and of --flops budgets (at the
               plan's own FLOPs and at 0.5) spread uniform or by measured sensitivity (on 64
               unlabeled images), next to each layer's damage when cut alone

    .venv/bin/python benchmarks/quality_explore.py [--model M] [--size 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).parent))

from quality import (
    Setup,
    attribution_vectors,
    cached_scores,
    categories,
    digit_subsets,
    group_vectors,
    held_out_check,
    metric_kept,
    plan_at_counts,
    ratios,
    sample_setup,
    score_model,
    score_plan,
    table,
    work_folder,
    zero_vectors,
)

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.scores import Scores, load_scores, save_scores
from onnxcut.attribution.selection import Selection, filter_l1, make_plan, mass_set
from onnxcut.channels.deps import trace
from onnxcut.graph.io import load


def sensitivity(setup: Setup, plan: Mapping, classes: Sequence[int], tmp: Path) -> list[dict]:
    """Cut one planned layer at a time (to the plan's count): plan's channels, l1 and random."""
    channels = trace(load(setup.model))
    ref = score_model(setup, setup.model, classes)
    l1 = group_vectors(plan, channels, filter_l1(channels))
    rng = np.random.default_rng(0)
    rows = []
    for layer, kept in plan["keep"].items():
        one = {**plan, "keep": {layer: kept}}
        dis = ratios(score_plan(setup, one, classes, tmp), ref)
        widths = {layer: rng.random(channels.group_of(layer).channels)}
        rows.append(
            {
                "layer": layer,
                "kept": f"{len(kept)}/{channels.group_of(layer).channels}",
                "flops_kept": dis["flops_kept"],
                "disassembler": dis["metric_kept"],
                "l1": metric_kept(
                    setup, plan_at_counts(one, {layer: l1[layer]}), classes, tmp, ref
                ),
                "random": metric_kept(setup, plan_at_counts(one, widths), classes, tmp, ref),
            }
        )
    return rows


def budgets(
    setup: Setup, scores: Scores, classes: Sequence[int], tmp: Path, shares: Sequence[float]
) -> list[dict]:
    """Per-group counts, each ranked by several scores: the same share of every group, the
    plan's counts, and those rounded up to a multiple of 8 (CPU kernels favour those widths)."""
    model = load(setup.model)
    channels = trace(model)
    plan = make_plan(model, scores, Selection(tuple(classes)))
    ranked = tuple(sorted({*classes, 0})) if setup.task == "segment" else tuple(classes)
    fwd, bwd = (attribution_vectors(scores, k, ranked) for k in ("forward", "backward"))
    widths = {k: len(v) for k, v in zero_vectors(plan, channels).items()}
    vectors = {
        "forward+backward": group_vectors(plan, channels, {k: fwd[k] + bwd[k] for k in fwd}),
        "taylor": group_vectors(plan, channels, attribution_vectors(scores, "taylor", ranked)),
        "taylor, chosen only": group_vectors(
            plan, channels, attribution_vectors(scores, "taylor", classes)
        ),
        "forward, chosen only": group_vectors(
            plan, channels, attribution_vectors(scores, "forward", classes)
        ),
        "l1": group_vectors(plan, channels, filter_l1(channels)),
        "random": {k: np.random.default_rng(0).random(n) for k, n in widths.items()},
    }
    rules = {f"share {r}": {k: max(1, round(r * n)) for k, n in widths.items()} for r in shares}
    rules["plan"] = {k: len(v) for k, v in plan["keep"].items()}
    rules["plan, up to x8"] = {
        k: min(widths[k], -(-len(v) // 8) * 8) for k, v in plan["keep"].items()
    }
    ref = score_model(setup, setup.model, classes)
    rows = []
    for rule, counts in rules.items():
        row: dict = {"counts": rule}
        for name, vec in vectors.items():
            r = ratios(score_plan(setup, plan_at_counts(plan, vec, counts), classes, tmp), ref)
            row.update(flops_kept=r["flops_kept"], latency_ms_kept=r["latency_ms_kept"])
            row[name] = r["metric_kept"]
        rows.append(row)
    return rows


def _rule_plan(base: dict, channels, scores: Scores, cats: Sequence[int], both: Callable) -> dict:
    """The plan's layers re-selected: per category both(forward set, backward set), united."""
    keep = {}
    for layer in base["keep"]:
        group = channels.group_of(layer)
        kept = np.zeros(group.channels, bool)
        for p in (p for p in group.producers if f"forward/{p}" in scores.arrays):
            f, b = scores.mean("forward", p), scores.mean("backward", p)  # each (K, C)
            for k in cats:
                kept |= both(mass_set(f[k], 0.9), mass_set(b[k], 0.9))
        keep[layer] = [int(c) for c in np.flatnonzero(kept)] or [0]
    return {**base, "keep": keep}


def logsoftmax_scores(setup: Setup, work: Path) -> Scores:
    """Scores of the model with a LogSoftmax appended: S_k = sum of log p_k over k's mask.

    Softmax is shift-invariant, so the confidence masks are the same; the gradient of log p_k
    also credits channels that push the competing categories (background) down.
    """
    path = work / f"{setup.model.stem}_logsoftmax.npz"
    if path.exists():
        return load_scores(path)
    model = onnx.load(setup.model)
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_logits" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node("LogSoftmax", [f"{out}_logits"], [out], axis=1))
    onnx.save(model, work / "logsoftmax.onnx")
    masks = str(setup.train_masks) if setup.train_masks else None
    opts = AttributeOptions(masks=masks, shard=setup.shard, threads=setup.threads)
    scores = attribute(work / "logsoftmax.onnx", setup.train, opts)
    save_scores(scores, path)
    return scores


def rules(setup: Setup, scores: Scores, classes: Sequence[int], work: Path, tmp: Path) -> list:
    """Other keep-set rules at their own sizes, each with l1 at the same per-group counts."""
    model = load(setup.model)
    channels = trace(model)
    base = make_plan(model, scores, Selection(tuple(classes)))
    bg = (0, *classes) if setup.task == "segment" else tuple(classes)
    plans = {
        "intersection, background + chosen (library)": base,
        "union, background + chosen": _rule_plan(base, channels, scores, bg, np.logical_or),
        "intersection, chosen only": _rule_plan(base, channels, scores, classes, np.logical_and),
        "union, chosen only": _rule_plan(base, channels, scores, classes, np.logical_or),
    }
    plan = make_plan(model, logsoftmax_scores(setup, work), Selection(tuple(classes)))
    plans["log-softmax objective (library rule)"] = {**plan, "model_sha256": None}
    ref = score_model(setup, setup.model, classes)
    l1 = group_vectors(base, channels, filter_l1(channels))
    rows = []
    for name, plan in plans.items():
        r = ratios(score_plan(setup, plan, classes, tmp), ref)
        same = metric_kept(setup, plan_at_counts(plan, l1), classes, tmp, ref)
        rows.append({"rule": name, "flops_kept": r["flops_kept"], "metric_kept": r["metric_kept"]})
        rows[-1]["l1 at same counts"] = same
    return rows


def _rank(v: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(v, kind="stable"), kind="stable")


def channels_vs_scores(
    setup: Setup, scores: Scores, classes: Sequence[int], layers: Sequence[str], tmp: Path
) -> list[dict]:
    """Remove one channel at a time; Spearman correlation of each score with the metric lost."""
    model = load(setup.model)
    channels = trace(model)
    plan = make_plan(model, scores, Selection(tuple(classes)))
    ref = score_model(setup, setup.model, classes)["metric"]
    l1 = group_vectors(plan, channels, filter_l1(channels))
    bg = [0] if setup.task == "segment" else []
    rows = []
    for layer in layers:
        n = channels.group_of(layer).channels
        lost = np.zeros(n)  # (C,) metric lost when channel c alone is removed
        for c in range(n):
            one = {**plan, "keep": {layer: [i for i in range(n) if i != c]}}
            lost[c] = ref - score_plan(setup, one, classes, tmp)["metric"]
        vectors = {"l1": l1[layer]}
        for kind in ("forward", "backward", "taylor"):
            mean = scores.mean(kind, layer)  # (K, C)
            vectors[kind] = mean[[*bg, *classes]].sum(0)
            vectors[f"{kind}, chosen only"] = mean[list(classes)].sum(0)
            if bg:
                vectors[f"{kind}, background only"] = mean[0]
        row = {"layer": layer, "largest single loss": float(lost.max())}
        for name, v in vectors.items():
            row[name] = float(np.corrcoef(_rank(v), _rank(lost))[0, 1])
        kept = plan["keep"][layer]
        row["loss of plan's dropped"] = float(np.delete(lost, kept).sum())
        row["loss of l1's dropped"] = float(lost[np.argsort(-l1[layer])[len(kept) :]].sum())
        rows.append(row)
    return rows


def allocations(
    setup: Setup, scores: Scores, classes: Sequence[int], tmp: Path, alone: Sequence[dict]
) -> list[dict]:
    """Kept counts per layer: the default plan, and budgets at its FLOPs and at 0.5 spread
    uniform or by sensitivity; the last row is the whole sub-network's metric kept."""
    model = load(setup.model)
    channels = trace(model)
    ref = score_model(setup, setup.model, classes)
    base = make_plan(model, scores, Selection(tuple(classes)))
    share = ratios(score_plan(setup, base, classes, tmp), ref)
    check = held_out_check(setup, model, classes)
    plans = {"plan": base}
    for flops in (round(share["flops_kept"], 3), 0.5):
        for how in ("uniform", "sensitivity"):
            sel = Selection(tuple(classes), flops=flops, allocate=how)
            plans[f"{how} @{flops}"] = make_plan(model, scores, sel, check=check)
    damage = {r["layer"]: r["disassembler"] for r in alone}
    rows = []
    for layer in base["keep"]:
        row = {"layer": layer.split("/")[-2] if "/" in layer else layer}
        row["alone"] = damage.get(layer, "")
        for name, plan in plans.items():
            row[name] = f"{len(plan['keep'].get(layer, []))}/{channels.group_of(layer).channels}"
        rows.append(row)
    total: dict = {"layer": "metric kept (FLOPs kept)", "alone": ""}
    for name, plan in plans.items():
        r = ratios(score_plan(setup, plan, classes, tmp), ref)
        total[name] = f"{r['metric_kept']:.3f} ({r['flops_kept']:.3f})"
    return [*rows, total]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deeplab_digits")
    p.add_argument("--size", type=int, default=2, help="digit subset size (as in quality.py)")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--channel-layers", type=int, default=2, help="most sensitive layers to probe")
    p.add_argument("--only", choices=["allocations"], help="run one part only")
    args = p.parse_args(argv)
    work = work_folder(args.work)
    setup = sample_setup(args.model, limit=args.limit)
    digits = digit_subsets([args.size])[args.size]
    classes = categories(setup, digits)
    scores = cached_scores(setup, work)
    print(f"{args.model}, digits {digits} (categories {classes}); metric kept = sub / original\n")
    with tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(load(setup.model), scores, Selection(classes))
        found = sensitivity(setup, plan, classes, Path(tmp))
        cols = ("layer", "kept", "flops_kept", "disassembler", "l1", "random")
        print(f"## One layer cut at a time (metric kept)\n\n{table(found, cols)}\n", flush=True)
        rows = allocations(setup, scores, classes, Path(tmp), found)
        title = "## Allocations: kept/total per layer ('alone': metric kept, plan's cut alone)"
        print(f"{title}\n\n{table(rows, list(rows[0]))}\n", flush=True)
        if args.only == "allocations":
            return
        worst = [r["layer"] for r in sorted(found, key=lambda r: r["disassembler"])]
        found = budgets(setup, scores, classes, Path(tmp), (0.5, 0.75, 0.9))
        cols = ("counts", "flops_kept", "latency_ms_kept", *list(found[0])[3:])
        print(f"## Other per-group counts (metric kept)\n\n{table(found, cols)}\n", flush=True)
        found = rules(setup, scores, classes, work, Path(tmp))
        print(f"## Other keep-set rules\n\n{table(found, list(found[0]))}\n", flush=True)
        found = channels_vs_scores(setup, scores, classes, worst[: args.channel_layers], Path(tmp))
        cols = list(found[0])
        flipped = [{"": c, **{r["layer"].split("/")[-2]: r[c] for r in found}} for c in cols[1:]]
        title = "## Single channels: Spearman correlation of each score with the metric lost"
        print(f"{title}\n\n{table(flipped, list(flipped[0]))}\n")


if __name__ == "__main__":
    main()
