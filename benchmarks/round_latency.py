"""Latency of a category sub-network with and without --round-to, against the original.

    python benchmarks/round_latency.py [--model M] [--classes 3,5] [--runs 200]

Attributes the model on the sample scenes, plans with the default thresholds, extracts with
round_to None, 4, 8 and 16, and prints FLOPs and median latency (1 thread, batch 1) as ratios
to the original measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnxcut
from onnxcut.attribution.selection import Selection, make_plan, parse_classes
from onnxcut.evaluation.metrics import EvalOptions, evaluate

ROOT = Path(__file__).resolve().parents[1]
SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "samples" / "models" / "deeplab_digits.onnx"))
    ap.add_argument("--classes", default="3,5")
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    scores = onnxcut.attribute(args.model, SCENES / "images")
    model = onnxcut.load(args.model)
    classes = parse_classes(args.classes, scores.categories)
    opts = EvalOptions(masks=str(SCENES / "masks"), latency_runs=args.runs, threads=1, limit=4)
    base = evaluate(args.model, SCENES / "images", opts)
    print(f"original: {base['flops']:,} MACs, {base['latency_ms']:.3f} ms (median of {args.runs})")
    print("round_to  FLOPs kept  latency kept  kept counts")
    with tempfile.TemporaryDirectory() as tmp:
        for round_to in (None, 4, 8, 16):
            plan = make_plan(model, scores, Selection(classes, round_to=round_to))
            path = onnxcut.save(onnxcut.extract(args.model, plan), Path(tmp) / "sub.onnx")
            sub = evaluate(path, SCENES / "images", opts)
            counts = sorted({len(v) for v in plan["keep"].values()})
            print(
                f"{round_to!s:>8}  {sub['flops'] / base['flops']:10.3f}  "
                f"{sub['latency_ms'] / base['latency_ms']:12.3f}  {counts}"
            )


if __name__ == "__main__":
    main()
