"""Category sub-networks at a FLOPs budget, before and after one epoch of label-free distill.

For each sample model and digit subset: plan with the Disassembler scores at `--flops`
(default 0.5 of the original's FLOPs), the budget allocated by measured sensitivity on 64
images of the unlabeled split, extract, evaluate on the validation split with the
category-customised metric; then distill one epoch against the original on the 1,000-image
unlabeled split, with `onnxcut distill`'s defaults (Adam, lr 1e-4, batch 16), with
--lr 1e-3 --batch 8, and with that and --warmup 0.2, and evaluate again. With
--reconstruct, the sub-network is first refit by least squares on 64 unlabeled images
(`extract --reconstruct`), and the "no training" column and the distill runs start from it.
Scores are cached under --work as in quality.py, whose helpers this uses.

    .venv/bin/python benchmarks/distill_budget.py [--models a,b] [--subsets 2] [--flops 0.5]
        [--reconstruct]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from quality import (
    MODELS,
    cached_scores,
    categories,
    digit_subsets,
    held_out_check,
    ratios,
    sample_setup,
    score_distilled,
    score_model,
    score_plan,
    table,
    unlabeled_images,
    work_folder,
)

from onnxcut.attribution.reconstruction import reconstruct
from onnxcut.attribution.selection import Selection, make_plan
from onnxcut.channels.surgery import extract
from onnxcut.graph.io import load, save
from onnxcut.train import DistillOptions

COLUMNS = (
    "model", "digits", "flops_kept", "params_kept", "no training", "+ distill",
    "+ distill lr 1e-3 batch 8", "+ same, warmup 0.2", "distill_s",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--subsets", default="2", help="subset sizes (digits of a seeded order)")
    p.add_argument("--flops", type=float, default=0.5, help="share of the FLOPs to keep")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reconstruct", action="store_true", help="refit before distilling")
    args = p.parse_args(argv)
    work = work_folder(args.work)
    subsets = digit_subsets([int(s) for s in args.subsets.split(",")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            setup = sample_setup(name, threads=args.threads)
            scores = cached_scores(setup, work)
            for digits in subsets.values():
                classes = categories(setup, digits)
                model = load(setup.model)
                check = held_out_check(setup, model, classes)
                plan = make_plan(model, scores, Selection(classes, flops=args.flops), check=check)
                ref = score_model(setup, setup.model, classes)
                refit = None
                if args.reconstruct:
                    images = unlabeled_images(setup)
                    refit = reconstruct(model, plan, images, threads=args.threads)
                    save(extract(refit, plan), Path(tmp) / "reconstructed.onnx")
                    cut = score_model(setup, Path(tmp) / "reconstructed.onnx", classes)
                    cut = ratios(cut, ref)
                else:
                    cut = ratios(score_plan(setup, plan, classes, Path(tmp)), ref)
                start = time.perf_counter()
                tuned = score_distilled(setup, plan, classes, Path(tmp), start=refit)
                tuned = ratios(tuned, ref)
                seconds = time.perf_counter() - start
                faster = DistillOptions(lr=1e-3, batch=8, threads=args.threads)
                fast = score_distilled(setup, plan, classes, Path(tmp), faster, start=refit)
                fast = ratios(fast, ref)
                ramped = replace(faster, warmup=0.2)
                warm = score_distilled(setup, plan, classes, Path(tmp), ramped, start=refit)
                warm = ratios(warm, ref)
                rows.append(
                    {
                        "model": name,
                        "digits": ",".join(map(str, digits)),
                        "flops_kept": cut["flops_kept"],
                        "params_kept": cut["params_kept"],
                        "no training": cut["metric_kept"],
                        "+ distill": tuned["metric_kept"],
                        "+ distill lr 1e-3 batch 8": fast["metric_kept"],
                        "+ same, warmup 0.2": warm["metric_kept"],
                        "distill_s": round(seconds, 1),
                    }
                )
                print(table(rows[-1:], COLUMNS) + "\n", flush=True)
    how = ", reconstructed first" if args.reconstruct else ""
    print(f"## Metric kept at --flops {args.flops}{how}\n\n" + table(rows, COLUMNS))


if __name__ == "__main__":
    main()
