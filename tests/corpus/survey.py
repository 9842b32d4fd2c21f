"""Run every verb on a corpus variant through the CLI and tabulate what happened.

inspect, attribute (four images), plan, extract, mask, refit (`extract --reconstruct` of a
plan without compensation), distill (the extracted model against
the original, two steps with feature hints) and eval (original and extracted), each through
click's CliRunner as a user would call it; then the extracted model is compared with the
masked one in onnxruntime on the kept categories.
"""

from __future__ import annotations

import io
import json
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from corpus.images import write_class_folders, write_images, write_masks
from corpus.variants import CATEGORIES, Variant

VERBS = ("inspect", "attribute", "plan", "extract", "mask", "refit", "distill", "eval")
_THREADS = ("--threads", "1")
TOLERANCE = 1e-5  # largest |extracted - masked| over the largest |masked|


@dataclass
class Outcome:
    """What one CLI call did."""

    exit_code: int
    output: str
    traceback: bool

    @property
    def cell(self) -> str:
        if self.traceback:
            return "TRACEBACK"
        return "ok" if self.exit_code == 0 else f"exit {self.exit_code}"


@dataclass
class Row:
    variant: str
    cells: dict[str, str] = field(default_factory=dict)
    difference: float | None = None  # extracted vs masked, relative
    params: str = "-"  # share of the parameters the extracted model keeps
    failures: list[str] = field(default_factory=list)  # "verb: last output line"

    @property
    def exact(self) -> str:
        if self.difference is None:
            return "-"
        return f"{self.difference:.1e}" if self.difference <= TOLERANCE else "FAIL"

    @property
    def passed(self) -> bool:
        verbs_ok = all(self.cells.get(v) == "ok" for v in VERBS)
        return verbs_ok and self.difference is not None and self.difference <= TOLERANCE


def invoke(args: Sequence[object]) -> Outcome:
    """Run `onnxcut ARGS` in-process; a traceback is any exception but SystemExit.

    Log records at WARNING and above count as output lines, as they would on a terminal.
    """
    from click.testing import CliRunner

    from onnxcut.cli.main import cli

    logged = io.StringIO()
    handler = logging.StreamHandler(logged)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        logging.getLogger().removeHandler(handler)
    output = logged.getvalue() + result.output
    bug = result.exception is not None and not isinstance(result.exception, SystemExit)
    if bug:
        output += "".join(traceback.format_exception(*result.exc_info))
    return Outcome(result.exit_code, output, bug or "Traceback" in output)


def write_data(root: Path, task: str) -> dict[str, Path]:
    """Four images to attribute on, and a labelled folder to evaluate on."""
    data = {"images": write_images(root / "images", 4, seed=1)}
    if task == "segment":
        data["masks"] = write_masks(data["images"], root / "masks", CATEGORIES)
        data["eval"] = data["images"]
    else:
        data["eval"] = write_class_folders(root / "classes", CATEGORIES)
    return data


def _confidence(variant: Variant) -> list[str]:
    """Random weights are unsure: a low tau for pixels, the two most confident images for
    classes (a class needs one image predicted as it)."""
    return ["--tau", "0.3"] if variant.task == "segment" else ["--top-k", "2"]


def _seen_classes(scores: Path, task: str) -> list[int]:
    """The (at most two) categories with the most images, background aside."""
    with np.load(scores, allow_pickle=False) as f:
        count = f["count"]
    order = [int(k) for k in np.argsort(-count, kind="stable") if count[k] > 0]
    if task == "segment":
        order = [k for k in order if k != 0]
    return sorted(order[:2])


def survey(variant: Variant, work: Path) -> Row:
    """Run every verb on the variant in `work`; return its row of the table."""
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    onnx.save(variant.build(), model)
    data = write_data(work, variant.task)
    row = Row(variant.name)
    scores, plan = work / "scores.npz", work / "plan.json"
    cut, masked = work / "cut.onnx", work / "masked.onnx"

    def step(verb: str, *args: object, cell: str | None = None) -> bool:
        outcome = invoke([verb, *args])
        row.cells[cell or verb] = outcome.cell
        if outcome.cell != "ok":
            last = (outcome.output.strip().splitlines() or [""])[-1]
            row.failures.append(f"{cell or verb}: {last}")
        elif verb == "extract" and cell is None:
            row.params = next(
                line.rsplit("(", 1)[1].rstrip(")")
                for line in outcome.output.splitlines()
                if line.startswith("params:")
            )
        return outcome.cell == "ok"

    step("inspect", model)
    if not step(
        "attribute", model, "--data", data["images"], "-o", scores, *_confidence(variant),
        *_THREADS, *variant.head_args,
    ):  # fmt: skip
        return row
    classes = _seen_classes(scores, variant.task)
    if not classes:
        row.cells["plan"] = "no category seen"
        return row
    chosen = ",".join(map(str, classes))
    # --compensate: the plan carries bias deltas, which extract and mask must apply alike.
    compensate = ["--compensate", data["images"]]
    if not step("plan", scores, "--classes", chosen, "--min-keep", "2", *compensate, "-o", plan):
        return row
    step("extract", model, "--plan", plan, "-o", cut)
    step("mask", model, "--plan", plan, "-o", masked)
    plain = work / "plain.json"  # reconstruction refits biases itself: no compensation
    if step("plan", scores, "--classes", chosen, "--min-keep", "2", "-o", plain, cell="refit"):
        refit = ["--plan", plain, "--reconstruct", data["images"], "-o", work / "refit.onnx"]
        step("extract", model, *refit, cell="refit")
    if cut.exists():
        step(
            "distill", cut, "--teacher", model, "--data", data["images"], "-o", work / "tuned.onnx",
            "--batch", "2", "--hints", "1", *_THREADS, *variant.head_args,
        )  # fmt: skip
    masks = ["--masks", data["masks"]] if "masks" in data else []
    evaluate = ["--data", data["eval"], *masks, *variant.head_args, "--runs", "1", *_THREADS]
    if cut.exists():  # the original, then the sub-network (categories from its metadata)
        step("eval", model, *evaluate) and step("eval", cut, *evaluate)
    if cut.exists() and masked.exists():
        row.difference = difference(cut, masked, json.loads(plan.read_text()))
    return row


def difference(cut: Path, masked: Path, plan: dict, seed: int = 0) -> float:
    """Largest |cut - masked| over the kept categories, relative to the largest |masked|."""
    from onnxcut.runtime import run

    model = onnx.load(cut)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in model.graph.input:
        if v.name in inits:
            continue
        d = [x.dim_value if x.dim_value > 0 else 2 for x in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(d).astype(np.float32)
    got, want = run(cut, feeds), run(masked, feeds)
    props = {p.key: p.value for p in model.metadata_props}
    kept = json.loads(props.get("onnxcut.categories", "{}"))
    worst = 0.0
    for name, full in want.items():
        ref = full
        if name in kept:
            axis = plan.get("outputs", {}).get(name, {}).get("axis", 1)
            ref = np.take(full, kept[name], axis=axis)
        if got[name].shape != ref.shape:
            return float("inf")
        scale = float(np.abs(full).max()) or 1.0
        worst = max(worst, float(np.abs(got[name] - ref).max()) / scale)
    return worst


def table(rows: Sequence[Row]) -> str:
    """A markdown table: variants x verbs, then the extracted-vs-masked difference."""
    head = ["variant", *VERBS, "params kept", "extracted vs masked"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.cells.get(v, "-") for v in VERBS]
        lines.append("| " + " | ".join([row.variant, *cells, row.params, row.exact]) + " |")
    return "\n".join(lines)
