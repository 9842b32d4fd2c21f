"""What `--compensate DIR` and `--reconstruct DIR` keep: the same plans with and without them.

    python benchmarks/compensation.py [--models a,b] [--subsets 2] [--work /tmp/quality]

For each model and digit subset, two plans (no training): the papers' default thresholds
(alpha = beta = tau = 0.9) and half the FLOPs (`--flops 0.5`, spread by sensitivity measured
on 64 unlabeled images). Each is scored as it is, with its compensation section (means from
256 images of the unlabeled split), and reconstructed (the readers of removed channels refit
by least squares on 64 unlabeled images); never on val. `l1 reconstructed` is the same
reconstruction of the plan whose per-group counts are kept but whose channels are the
largest filters (L1 norm): does the papers' choice of channels still matter once refit?
The metric kept is the sub-network's over the original's on the category-customised val
task (mIoU of background plus the chosen digits, or top-1 on the chosen classes).
`deeplab_wide_digits` (the wide sample) is trained first when missing, as
benchmarks/wide_sample.py does.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from quality import (
    MODELS,
    cached_scores,
    categories,
    digit_subsets,
    group_vectors,
    held_out_check,
    plan_at_counts,
    ratios,
    sample_setup,
    score_model,
    score_plan,
    table,
    unlabeled_images,
    work_folder,
)
from wide_sample import WIDE, wide_setup

from onnxcut.attribution.compensation import compensate
from onnxcut.attribution.reconstruction import reconstruct
from onnxcut.attribution.selection import Selection, filter_l1, make_plan
from onnxcut.channels import extract, trace
from onnxcut.graph.io import load, save

COLUMNS = (
    "model", "digits", "plan", "flops_kept", "metric_kept", "compensated", "reconstructed",
    "l1 reconstructed", "readers",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join([*MODELS, WIDE]))
    p.add_argument("--subsets", default="2", help="subset sizes (digits of a seeded order)")
    p.add_argument("--work", type=Path, default=None, help="cache folder for scores (.npz)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    work = work_folder(args.work)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            kw = {"threads": args.threads}
            setup = wide_setup(**kw) if name == WIDE else sample_setup(name, **kw)
            scores = cached_scores(setup, work)
            model = load(setup.model)
            channels = trace(model)
            for digits in digit_subsets([int(s) for s in args.subsets.split(",")]).values():
                classes = categories(setup, digits)
                ref = score_model(setup, setup.model, classes)
                check = held_out_check(setup, model, classes)
                half = Selection(classes, flops=0.5)
                plans = {
                    "default": make_plan(model, scores, Selection(classes)),
                    "flops 0.5": make_plan(model, scores, half, check=check),
                }
                for label, plan in plans.items():
                    plain = ratios(score_plan(setup, plan, classes, Path(tmp)), ref)
                    fixed = compensate(model, plan, unlabeled_images(setup), threads=args.threads)
                    kept = ratios(score_plan(setup, fixed.to_dict(), classes, Path(tmp)), ref)
                    rebuilt = _reconstructed(setup, model, plan, classes, ref, Path(tmp), args)
                    l1 = plan_at_counts(plan, group_vectors(plan, channels, filter_l1(channels)))
                    l1_rebuilt = _reconstructed(setup, model, l1, classes, ref, Path(tmp), args)
                    rows.append(
                        {
                            "model": name,
                            "digits": ",".join(map(str, digits)),
                            "plan": label,
                            "flops_kept": plain["flops_kept"],
                            "metric_kept": plain["metric_kept"],
                            "compensated": kept["metric_kept"],
                            "reconstructed": rebuilt["metric_kept"],
                            "l1 reconstructed": l1_rebuilt["metric_kept"],
                            "readers": len(fixed.compensation),
                        }
                    )
                    print(table(rows[-1:], COLUMNS) + "\n", flush=True)
    print("## Compensation and reconstruction, no training\n\n" + table(rows, COLUMNS))


def _reconstructed(setup, model, plan, classes, ref, tmp: Path, args) -> dict:
    """Metric kept by the plan's sub-network after reconstruction on unlabeled images."""
    refit = reconstruct(model, plan, unlabeled_images(setup), threads=args.threads)
    path = tmp / "reconstructed.onnx"
    save(extract(refit, plan), path)
    return ratios(score_model(setup, path, classes), ref)


if __name__ == "__main__":
    main()
