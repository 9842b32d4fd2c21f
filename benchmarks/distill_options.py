"""distill's options side by side: one epoch with and without one of them, over shuffle seeds.

For each sample model and digit subset: plan at `--flops` (default half the FLOPs, the
budget spread by measured sensitivity as in distill_budget.py), extract it as cut and
refit by `extract --reconstruct` (64 unlabeled images), then distill one epoch against the
original on the 1,000-image unlabeled split at each `--lr`, once per seed (the image order),
with the defaults and with the option `--compare` names, and evaluate on the validation
split:
  hints     --hints 0 against --hints W (`--hints`, default 1)
  dropped   --dropped renormalise against --dropped background (segmenters only)
Prints the metric kept (the sub-network's over the original's, category-customised) per
run, and the mean and worst over the seeds.

    .venv/bin/python benchmarks/distill_options.py [--compare hints|dropped] [--models a,b]
        [--subsets 2] [--lrs 1e-4,1e-3] [--hints 1] [--warmup 0] [--seeds 0,1,2] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from quality import (
    MODELS,
    cached_scores,
    categories,
    digit_subsets,
    held_out_check,
    ratios,
    sample_setup,
    score_model,
    table,
    unlabeled_images,
    work_folder,
)

from onnxcut.attribution.reconstruction import reconstruct
from onnxcut.attribution.selection import Selection, make_plan
from onnxcut.channels.surgery import extract
from onnxcut.graph.io import load, save
from onnxcut.train import DistillOptions, distill

COLUMNS = ("model", "digits", "start", "lr", "option", "no training", "runs", "mean", "worst")


def settings(compare: str, hints: float) -> list[tuple[str, dict]]:
    """(label, DistillOptions fields) of the two runs compared."""
    if compare == "hints":
        return [("hints 0", {}), (f"hints {hints:g}", {"hints": hints})]
    return [("renormalise", {}), ("background", {"dropped": "background"})]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--subsets", default="2", help="subset sizes (digits of a seeded order)")
    p.add_argument("--flops", type=float, default=0.5, help="share of the FLOPs to keep")
    p.add_argument("--lrs", default="1e-4,1e-3", help="learning rates (Adam, batch 16)")
    p.add_argument("--compare", choices=("hints", "dropped"), default="hints")
    p.add_argument("--hints", type=float, default=1.0, help="the hint weight to compare")
    p.add_argument("--warmup", type=float, default=0.0, help="distill --warmup, both runs")
    p.add_argument("--seeds", default="0,1,2", help="shuffle seeds")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    work = work_folder(args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    subsets = digit_subsets([int(s) for s in args.subsets.split(",")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        for name in args.models.split(","):
            setup = sample_setup(name, threads=args.threads)
            if args.compare == "dropped" and setup.task != "segment":
                continue
            scores = cached_scores(setup, work)
            images = unlabeled_images(setup)
            for digits in subsets.values():
                classes = categories(setup, digits)
                model = load(setup.model)
                check = held_out_check(setup, model, classes)
                plan = make_plan(model, scores, Selection(classes, flops=args.flops), check=check)
                ref = score_model(setup, setup.model, classes)
                refit = reconstruct(model, plan, images, threads=args.threads)
                for start, source in (("cut", model), ("reconstructed", refit)):
                    sub = extract(source, dict(plan))
                    save(sub, out)
                    before = ratios(score_model(setup, out, classes), ref)["metric_kept"]
                    for lr in (float(x) for x in args.lrs.split(",")):
                        for label, fields in settings(args.compare, args.hints):
                            kept = []
                            for seed in seeds:
                                opts = DistillOptions(
                                    lr=lr,
                                    warmup=args.warmup,
                                    seed=seed,
                                    threads=args.threads,
                                    **fields,
                                )
                                save(distill(sub, setup.model, images, opts), out)
                                score = score_model(setup, out, classes)
                                kept.append(ratios(score, ref)["metric_kept"])
                            rows.append(
                                {
                                    "model": name,
                                    "digits": ",".join(map(str, digits)),
                                    "start": start,
                                    "lr": f"{lr:g}",
                                    "option": label,
                                    "no training": before,
                                    "runs": " / ".join(f"{k:.3f}" for k in kept),
                                    "mean": float(np.mean(kept)),
                                    "worst": min(kept),
                                }
                            )
                            print(table(rows[-1:], COLUMNS) + "\n", flush=True)
    print(f"## Metric kept at --flops {args.flops}, one epoch\n\n" + table(rows, COLUMNS))


if __name__ == "__main__":
    main()
