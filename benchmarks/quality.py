"""Quality of category sub-networks cut without training, against baselines at the same size.

For each sample model and digit subset: attribute once on a shard of the training split
(cached under --work), plan with the Disassembler criterion, extract, and evaluate on the
validation split with the category-customised metric; the original model is scored on the
same task. Baselines keep exactly the plan's per-group channel counts:

    l1        channels with the largest L1 norm of their filters (summed over a group's producers)
    random    seeded random channels (mean over --seeds seeds)
    forward, backward, taylor
              the plan's counts filled with the top channels by that attribution score alone,
              summed over the chosen categories (and background for segmenters)

    disassembler + distill
              the plan's sub-network after one epoch of label-free `onnxcut distill` against
              the original, on the 1,000-image unlabeled split (`make_data.py --splits
              unlabeled`, made on demand); `--no-distill` skips it

Also an alpha=beta and tau sweep for one model and subset (`--sweep MODEL:SIZE`).
`quality_explore.py` digs into why: per-layer and per-channel sensitivity, other budgets.

    .venv/bin/python benchmarks/quality.py [--models a,b] [--subsets 1,2,5] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from onnxcut.attribution.agreement import AgreementCheck
from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.scores import Scores, load_scores, save_scores
from onnxcut.attribution.selection import Selection, filter_l1, make_plan
from onnxcut.channels.deps import ChannelTrace, trace
from onnxcut.channels.surgery import extract
from onnxcut.errors import DataError
from onnxcut.evaluation.metrics import EvalOptions, evaluate
from onnxcut.graph.io import load, save, sha256
from onnxcut.train import DistillOptions, distill

ROOT = Path(__file__).resolve().parents[1]
SEG = ROOT / "samples" / "data" / "digit_scenes"
CLS = ROOT / "samples" / "data" / "digits_cls"
MODELS = {
    "deeplab_digits": "segment",
    "unet_digits": "segment",
    "mobilenet_digits_seg": "segment",
    "resnet_digits_cls": "classify",
    "vgg_digits_cls": "classify",
}
BASELINES = ("l1", "random", "forward", "backward", "taylor")


@dataclass(frozen=True)
class Setup:
    model: Path
    task: str  # segment or classify
    images: Path  # evaluation images (validation split)
    masks: Path | None
    train: Path  # attribution images (training split)
    train_masks: Path | None
    shard: str | None = "1/12"  # the part of the training split attribution reads
    limit: int | None = None  # evaluate the first N images only
    threads: int = 1
    latency_runs: int = 20
    unlabeled: Path | None = None  # distillation images
    distill: bool = True


def sample_setup(name: str, **kw) -> Setup:
    """The setup of a sample model: validation split to evaluate, training shard to attribute."""
    task = MODELS[name]
    model = ROOT / "samples" / "models" / f"{name}.onnx"
    if task == "segment":
        val, train = SEG / "val", SEG / "train"
        return Setup(
            model,
            task,
            val / "images",
            val / "masks",
            train / "images",
            train / "masks",
            unlabeled=SEG / "unlabeled",
            **kw,
        )
    kw = {"shard": "1/20", "unlabeled": CLS / "unlabeled", **kw}
    return Setup(model, task, CLS / "val", None, CLS / "train", None, **kw)


def unlabeled_images(setup: Setup) -> Path:
    """The unlabeled split, generated (deterministically) the first time it is needed."""
    assert setup.unlabeled is not None
    if not setup.unlabeled.is_dir():
        sys.path.insert(0, str(ROOT / "samples"))
        from make_data import generate

        generate(ROOT / "samples" / "data", ["unlabeled"])
    return setup.unlabeled


def held_out_check(setup: Setup, model, classes: Sequence[int], limit: int = 64) -> AgreementCheck:
    """Agreement with `model` on `limit` unlabeled images, as `onnxcut plan --data` measures
    it: the chosen categories (and background for segmenters, on the customised task)."""
    segment = setup.task == "segment"
    kept = sorted({0, *classes}) if segment else list(classes)
    return AgreementCheck(
        model,
        unlabeled_images(setup),
        kept,
        limit=limit,
        threads=setup.threads,
        background=0 if segment else None,
    )


def score_distilled(
    setup: Setup,
    plan: Mapping,
    classes: Sequence[int],
    tmp: Path,
    opts: DistillOptions | None = None,
    start=None,
) -> dict:
    """Extract the plan's sub-network, distill it (one epoch by default), and evaluate it.
    `start` is a model of the original's shape (a reconstructed one) to extract instead."""
    sub = extract(setup.model if start is None else start, dict(plan))
    opts = opts or DistillOptions(threads=setup.threads)
    path = tmp / "distilled.onnx"
    save(distill(sub, setup.model, unlabeled_images(setup), opts), path)
    return score_model(setup, path, classes)


def digit_subsets(sizes: Sequence[int], seed: int = 0) -> dict[int, tuple[int, ...]]:
    """Nested digit subsets: the first n digits of one seeded permutation of 0..9."""
    order = np.random.default_rng(seed).permutation(10)
    return {n: tuple(sorted(int(d) for d in order[:n])) for n in sizes}


def categories(setup: Setup, digits: Sequence[int]) -> tuple[int, ...]:
    """Model categories of digits: segmenters put background at 0, digit d at d + 1."""
    return tuple(d + 1 for d in digits) if setup.task == "segment" else tuple(digits)


def work_folder(path: Path | None) -> Path:
    """The --work cache folder, made if missing; a fresh temporary one when not given."""
    work = path or Path(tempfile.mkdtemp(prefix="onnxcut-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    return work


def cached_scores(setup: Setup, work: Path, tau: float = 0.9) -> Scores:
    """Attribute once per model, shard and tau; reuse the .npz under `work` when present."""
    shard = (setup.shard or "all").replace("/", "of")
    path = work / f"{setup.model.stem}_tau{tau}_{shard}.npz"
    if path.exists():
        return load_scores(path, sha256(setup.model))
    masks = str(setup.train_masks) if setup.train_masks else None
    opts = AttributeOptions(tau=tau, masks=masks, shard=setup.shard, threads=setup.threads)
    scores = attribute(setup.model, setup.train, opts)
    save_scores(scores, path)
    return scores


def attribution_vectors(scores: Scores, kind: str, classes: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-layer (C,) sums over `classes` of one kind's per-category mean vectors."""
    return {layer: scores.mean(kind, layer)[list(classes)].sum(0) for layer in scores.layers(kind)}


def group_vectors(
    plan: Mapping, channels: ChannelTrace, by_producer: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Sum producer vectors over each planned layer's channel group, keyed by plan layer."""
    out = {}
    for layer in plan["keep"]:
        group = channels.group_of(layer)
        parts = [by_producer[p] for p in group.producers if p in by_producer]
        parts = [v for v in parts if v.shape == (group.channels,)]
        assert parts, f"no scores for group of {layer}"
        out[layer] = np.sum(parts, axis=0)
    return out


def plan_at_counts(plan: Mapping, vectors: Mapping[str, np.ndarray], counts=None) -> dict:
    """The plan with each layer's kept channels replaced by the top `count` by `vectors`.

    `counts` (layer -> int) defaults to the plan's own per-layer counts; `outputs` is kept.
    """
    keep = {}
    for layer, kept in plan["keep"].items():
        n = len(kept) if counts is None else counts[layer]
        top = np.argsort(-np.asarray(vectors[layer], np.float64), kind="stable")[:n]
        keep[layer] = sorted(int(c) for c in top)
    return {**plan, "keep": keep}


def score_model(setup: Setup, model: Path, classes: Sequence[int]) -> dict:
    opts = EvalOptions(
        masks=str(setup.masks) if setup.masks else None,
        classes=tuple(classes),
        threads=setup.threads,
        latency_runs=setup.latency_runs,
        limit=setup.limit,
    )
    report = evaluate(model, setup.images, opts)
    metric = report["miou"] if setup.task == "segment" else report["top1"]
    row = {k: report[k] for k in ("params", "flops", "latency_ms")}
    return {**row, "metric": metric, "metric_classes": report.get("miou_classes", metric)}


def score_plan(setup: Setup, plan: Mapping, classes: Sequence[int], tmp: Path) -> dict:
    """Extract the plan's sub-network and evaluate it on the customised task."""
    path = tmp / "sub.onnx"
    save(extract(setup.model, dict(plan)), path)
    return score_model(setup, path, classes)


def ratios(row: dict, ref: dict) -> dict:
    out = dict(row)
    for key in ("params", "flops", "latency_ms", "metric", "metric_classes"):
        out[f"{key}_kept"] = row[key] / ref[key] if ref[key] else float("nan")
    return out


def compare(
    setup: Setup,
    scores: Scores,
    classes: Sequence[int],
    tmp: Path,
    sel: Selection | None = None,
    seeds: int = 3,
) -> list[dict]:
    """Rows for the original, the plan and each baseline at the plan's per-group counts."""
    sel = replace(sel or Selection(classes=()), classes=tuple(classes))
    model = load(setup.model)
    channels = trace(model)
    plan = make_plan(model, scores, sel)
    ref = score_model(setup, setup.model, classes)
    rows = [{"method": "original", **ratios(ref, ref), "plan": None}]
    rows.append({"method": "disassembler", **ratios(score_plan(setup, plan, classes, tmp), ref)})
    rows[-1]["plan"] = plan
    if setup.distill:
        row = ratios(score_distilled(setup, plan, classes, tmp), ref)
        rows.append({"method": "disassembler + distill", **row, "plan": plan})
    ranked = tuple(sorted({*classes, *([sel.background] if setup.task == "segment" else [])}))
    plans = {"l1": plan_at_counts(plan, group_vectors(plan, channels, filter_l1(channels)))}
    for kind in ("forward", "backward", "taylor"):
        vectors = group_vectors(plan, channels, attribution_vectors(scores, kind, ranked))
        plans[kind] = plan_at_counts(plan, vectors)
    for method in BASELINES:
        if method != "random":
            row = score_plan(setup, plans[method], classes, tmp)
            rows.append({"method": method, **ratios(row, ref), "plan": plans[method]})
            continue
        runs = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            random = plan_at_counts(
                plan, {k: rng.random(len(v)) for k, v in zero_vectors(plan, channels).items()}
            )
            runs.append(score_plan(setup, random, classes, tmp))
        mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        rows.append({"method": f"random (x{seeds})", **ratios(mean, ref), "plan": random})
    return rows


def zero_vectors(plan: Mapping, channels: ChannelTrace) -> dict[str, np.ndarray]:
    return {layer: np.zeros(channels.group_of(layer).channels) for layer in plan["keep"]}


def sweep(
    setup: Setup,
    classes: Sequence[int],
    work: Path,
    tmp: Path,
    shares: Sequence[float],
    taus: Sequence[float],
) -> list[dict]:
    """Disassembler plans over alpha=beta (tau 0.9) and tau (alpha=beta 0.9), with l1 and random."""
    channels = trace(load(setup.model))
    ref = score_model(setup, setup.model, classes)
    l1 = filter_l1(channels)
    rows = []
    points = [(s, 0.9) for s in shares] + [(0.9, t) for t in taus if t != 0.9]
    for share, tau in points:
        scores = cached_scores(setup, work, tau)
        plan = make_plan(load(setup.model), scores, Selection(tuple(classes), share, share))
        row = {"alpha=beta": share, "tau": tau}
        dis = ratios(score_plan(setup, plan, classes, tmp), ref)
        row.update(flops_kept=dis["flops_kept"], disassembler=dis["metric_kept"])
        row["l1"] = metric_kept(
            setup, plan_at_counts(plan, group_vectors(plan, channels, l1)), classes, tmp, ref
        )
        rng = np.random.default_rng(0)
        random = plan_at_counts(
            plan, {k: rng.random(len(v)) for k, v in zero_vectors(plan, channels).items()}
        )
        row["random"] = metric_kept(setup, random, classes, tmp, ref)
        rows.append(row)
    return rows


def metric_kept(setup: Setup, plan: Mapping, classes: Sequence[int], tmp: Path, ref: dict) -> float:
    return score_plan(setup, plan, classes, tmp)["metric"] / ref["metric"]


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table; floats with 3 decimals."""

    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


COMPARE_COLUMNS = (
    "model", "digits", "method", "metric", "metric_kept", "metric_classes", "metric_classes_kept",
    "flops_kept", "params_kept", "latency_ms_kept",
)  # fmt: skip


def _model_scores(setup: Setup, work: Path, needed: Sequence[int]) -> tuple[Scores, float]:
    """Scores at tau 0.9, or at 0.5 when a needed category never reaches 0.9 (weak models)."""
    for tau in (0.9, 0.5):
        scores = cached_scores(setup, work, tau)
        if all(scores.count[k] > 0 for k in needed):
            return scores, tau
        print(f"note: {setup.model.stem}: categories {needed} not all seen at p > {tau}")
    return scores, tau


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--subsets", default="1,2,5", help="subset sizes (digits of a seeded order)")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--seeds", type=int, default=3, help="random baseline seeds to average")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--sweep", default="deeplab_digits:2", help="MODEL:SIZE, or 'none'")
    p.add_argument("--round-to", type=int, default=None, help="Selection.round_to for plans")
    p.add_argument("--quick", action="store_true", help="deeplab, subset size 2, no sweep")
    p.add_argument("--no-distill", action="store_true", help="skip the + distill rows")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.subsets, args.sweep = "deeplab_digits", "2", "none"
    work = work_folder(args.work)
    subsets = digit_subsets([int(s) for s in args.subsets.split(",")])
    print(f"digit subsets (first n of seed-0 permutation): {subsets}; scores cache: {work}\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            setup = sample_setup(name, limit=args.limit, distill=not args.no_distill)
            if not setup.model.exists():
                print(f"skipped {name}: {setup.model} not found (not trained yet)\n")
                continue
            for digits in subsets.values():
                scores, tau = _model_scores(setup, work, categories(setup, digits))
                label = name if tau == 0.9 else f"{name} (tau {tau})"
                try:
                    classes = categories(setup, digits)
                    sel = Selection(classes, round_to=args.round_to)
                    found = compare(setup, scores, classes, Path(tmp), sel, args.seeds)
                except DataError as e:  # a weak model never confident on some digit
                    print(f"skipped {name}, digits {digits}: {e}\n")
                    continue
                rows += [{"model": label, "digits": ",".join(map(str, digits)), **r} for r in found]
                print(table(rows[-len(found) :], COMPARE_COLUMNS) + "\n", flush=True)
        print("## All results\n\n" + table(rows, COMPARE_COLUMNS) + "\n")
        if args.sweep != "none":
            name, size = args.sweep.split(":")
            setup = sample_setup(name, limit=args.limit)
            digits = digit_subsets([int(size)])[int(size)]
            classes = categories(setup, digits)
            cols = ("alpha=beta", "tau", "flops_kept", "disassembler", "l1", "random")
            found = sweep(setup, classes, work, Path(tmp), (0.8, 0.9, 0.95, 0.98), (0.5, 0.7, 0.9))
            title = f"## Sweep: {name}, digits {digits} (categories {classes}), metric kept"
            print(f"{title}; random: seed 0\n\n{table(found, cols)}\n")


if __name__ == "__main__":
    main()
