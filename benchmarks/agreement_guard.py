"""What `--min-agreement A` costs and keeps: the smallest sub-network agreeing with the original.

For each sample model and digit subset: `plan --min-agreement A --data UNLABELED` (the budget
bisected; each layer's sensitivity measured on the same held-out images, 64 of the unlabeled
split, or --images N), then the FLOPs kept, the agreement reached on those images, the same
agreement on the validation images, and the metric kept on the validation split
(category-customised task, labels used only here). No training. With --reconstruct, every
candidate the bisection measures, and the sub-network scored, is refit by least squares on 64
unlabeled images first, not those the agreement is measured on (`extract --min-agreement A
--data D --reconstruct D2`, which leaves D's images out of the refit).

    .venv/bin/python benchmarks/agreement_guard.py [--models a,b] [--subsets 1,2,5] [--min 0.95]
        [--reconstruct] [--confidence C]

The guard compares the agreement's bootstrap lower bound over the images (the value that
--confidence C of resamples reach, 0.95 as `plan` defaults to); --confidence 0 compares the
agreement on the images alone.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

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

from onnxcut.attribution.agreement import AgreementCheck, guarded_plan
from onnxcut.attribution.reconstruction import reconstruct
from onnxcut.attribution.selection import Selection, make_plan
from onnxcut.channels import extract
from onnxcut.errors import DataError
from onnxcut.graph.io import load, save

COLUMNS = (
    "model",
    "digits",
    "min_agreement",
    "agreement",
    "val_agreement",
    "flops_kept",
    "metric_kept",
)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--subsets", default="1,2,5", help="subset sizes (digits of a seeded order)")
    p.add_argument("--min", type=float, default=0.95, help="the agreement to keep")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="unlabeled images to agree on")
    p.add_argument("--reconstruct", action="store_true", help="refit every candidate first")
    p.add_argument("--confidence", type=float, default=0.95, help="bootstrap lower bound (0: none)")
    args = p.parse_args(argv)
    work = work_folder(args.work)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            setup = sample_setup(name, threads=args.threads)
            scores = cached_scores(setup, work)
            model = load(setup.model)
            for digits in digit_subsets([int(s) for s in args.subsets.split(",")]).values():
                classes = categories(setup, digits)
                check = held_out_check(setup, model, classes, limit=args.images)
                cut = extract
                if args.reconstruct:
                    images = unlabeled_images(setup)

                    def cut(m, plan, images=images, check=check):
                        refit = reconstruct(
                            m, plan, images, threads=args.threads, exclude=check.paths
                        )
                        return extract(refit, plan)

                row = {
                    "model": name,
                    "digits": ",".join(map(str, digits)),
                    "min_agreement": args.min,
                }
                try:
                    plan = guarded_plan(
                        model,
                        partial(make_plan, model, scores),
                        Selection(classes),
                        check,
                        args.min,
                        cut=cut,
                        confidence=args.confidence or None,
                    )
                except DataError as e:  # only the whole model agrees
                    print(f"{name} {digits}: {e}\n")
                    rows.append({**row, "agreement": "whole model only"})
                    continue
                ref = score_model(setup, setup.model, classes)
                sub = cut(model, plan)
                save(sub, Path(tmp) / "guarded.onnx")
                got = ratios(score_model(setup, Path(tmp) / "guarded.onnx", classes), ref)
                # The same agreement on the validation images: how far the unlabeled split's
                # figure carries to the images the metric is measured on.
                on_val = AgreementCheck(
                    model,
                    setup.images,
                    check.categories,
                    threads=args.threads,
                    background=0 if setup.task == "segment" else None,
                )
                row.update(
                    agreement=plan["selection"]["agreement"],
                    val_agreement=round(on_val(sub), 3),
                    flops_kept=got["flops_kept"],
                    metric_kept=got["metric_kept"],
                )
                rows.append(row)
                print(table(rows[-1:], COLUMNS) + "\n", flush=True)
    how = ", reconstructed" if args.reconstruct else ""
    print(f"## --min-agreement {args.min}, no training{how}\n\n" + table(rows, COLUMNS))


if __name__ == "__main__":
    main()
