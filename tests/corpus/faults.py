"""The fault matrix: broken model files, data, plans, scores and checkpoints, each given to
every verb that reads it. Each case must exit with code 2, print one line and write nothing.

`make_base` writes the good files (a segmentation net, its scores, plan, and a cut student);
the `*_cases` functions write the broken ones beside them and list (group, case, verb, args),
"{out}" in args standing for an empty output folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from corpus import broken
from corpus.images import write_images, write_masks
from corpus.survey import invoke
from corpus.variants import CATEGORIES, VARIANTS

OUT = "{out}"
_QUICK = ("--threads", "1")
_DISTILL = ("--batch", "2", *_QUICK)


@dataclass(frozen=True)
class Base:
    """The good files the broken ones are made from, under `root`."""

    root: Path
    model: Path  # a segmentation net
    other: Path  # the same architecture (node names) with other weights
    images: Path
    masks: Path
    scores: Path
    plan: Path  # made by `onnxcut plan`, with model_sha256
    plan_unsigned: Path  # the same without model_sha256
    cut: Path  # extracted by the plan: a distill student


def _ok(*args: object) -> None:
    outcome = invoke(args)
    assert outcome.exit_code == 0, outcome.output


def make_base(root: Path) -> Base:
    root.mkdir(parents=True, exist_ok=True)
    model, other = root / "model.onnx", root / "other.onnx"
    onnx.save(VARIANTS["ir8-opset17"].build(), model)
    onnx.save(VARIANTS["ir8-opset15"].build(), other)
    images = write_images(root / "images", 4, seed=1)
    masks = write_masks(images, root / "masks", CATEGORIES)
    scores, plan, cut = root / "scores.npz", root / "plan.json", root / "cut.onnx"
    _ok("attribute", model, "--data", images, "-o", scores, "--tau", "0.3", *_QUICK)
    _ok("plan", scores, "--classes", "1,2", "--min-keep", "2", "-o", plan)
    _ok("extract", model, "--plan", plan, "-o", cut)
    unsigned = broken.plan_edit(plan, root / "plan_unsigned.json", lambda p: p.pop("model_sha256"))
    return Base(root, model, other, images, masks, scores, plan, unsigned, cut)


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    verb: str
    args: tuple[str, ...]


Verbs = dict[str, list[object]]


def _cases(group: str, name: str, verbs: Verbs) -> list[Case]:
    return [Case(group, name, v, tuple(str(a) for a in args)) for v, args in verbs.items()]


def _model_verbs(m: Path, b: Base) -> Verbs:
    """Every verb that reads a model, reading `m`."""
    distill = ["--data", b.images, "-o", f"{OUT}/d.onnx", *_DISTILL]
    return {
        "inspect": ["inspect", m],
        "attribute": ["attribute", m, "--data", b.images, "-o", f"{OUT}/s.npz", *_QUICK],
        "extract": ["extract", m, "--plan", b.plan_unsigned, "-o", f"{OUT}/cut.onnx"],
        "mask": ["mask", m, "--plan", b.plan_unsigned, "-o", f"{OUT}/masked.onnx"],
        "eval": ["eval", m, "--data", b.images, "--masks", b.masks, "--runs", "1", *_QUICK],
        "distill": ["distill", m, "--teacher", b.model, *distill],
        "distill --teacher": ["distill", b.cut, "--teacher", m, *distill],
    }


def model_cases(b: Base, draws: int, seed: int = 0) -> list[Case]:
    """Broken model files; `draws` truncations and bit flips at seeded random offsets."""
    d = b.root / "broken_models"
    for sub in ("outside", "missing"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good = b.model
    files = {
        "zero-length": broken.zero_length(good, d / "zero.onnx"),
        "text": broken.text(good, d / "text.onnx"),
        "cyclic graph": broken.cyclic(good, d / "cyclic.onnx"),
        "node output written twice": broken.output_twice(good, d / "twice.onnx"),
        "2^31 input dimension": broken.huge_input_dim(good, d / "huge_input.onnx"),
        "2^31 initializer dimension": broken.huge_initializer_dim(good, d / "huge_init.onnx"),
        "external data outside the folder": broken.external(
            good, d / "outside" / "m.onnx", "../w.bin", write_data=True
        ),
        "external data missing": broken.external(
            good, d / "missing" / "m.onnx", "w.bin", write_data=False
        ),
    }
    for i in range(draws):
        path = broken.truncated(good, d / f"truncated_{i}.onnx", rng)
        files[f"truncated at byte {path.stat().st_size}"] = path
    for i in range(draws):
        files[f"bit flip #{i + 1}"] = broken.bit_flipped(good, d / f"flip_{i}.onnx", rng, False)
    return [
        c for name, path in files.items() for c in _cases("model file", name, _model_verbs(path, b))
    ]


def _data_verbs(images: Path, masks: Path, b: Base) -> Verbs:
    """Every verb that reads images and label masks."""
    data = ["--data", images, "--masks", masks]
    return {
        "attribute": ["attribute", b.model, *data, "-o", f"{OUT}/s.npz", "--tau", "0.3", *_QUICK],
        "eval": ["eval", b.model, *data, "--runs", "1", *_QUICK],
        "distill": [
            "distill",
            b.cut,
            "--teacher",
            b.model,
            *data,
            "-o",
            f"{OUT}/d.onnx",
            *_DISTILL,
        ],
    }


def data_cases(b: Base) -> list[Case]:
    d = b.root / "broken_data"
    d.mkdir(exist_ok=True)
    folders = {
        "unreadable image": broken.unreadable_images(d / "unreadable"),
        "zero-size image": broken.zero_size_images(d / "zero"),
        "huge image (100000 x 100000)": broken.huge_images(d / "huge"),
    }
    out = []
    for name, images in folders.items():
        verbs = _data_verbs(images, b.masks, b)
        verbs["plan --min-agreement"] = [
            "plan", b.scores, "--classes", "1,2", "--min-agreement", "0.5", "--data", images,
            "-o", f"{OUT}/p.json",
        ]  # fmt: skip
        verbs["plan --compensate"] = [
            "plan", b.scores, "--classes", "1,2", "--compensate", images, "-o", f"{OUT}/p.json",
        ]  # fmt: skip
        verbs["extract --reconstruct"] = [
            "extract", b.model, "--scores", b.scores, "--classes", "1,2", "--reconstruct",
            images, "-o", f"{OUT}/r.onnx",
        ]  # fmt: skip
        out += _cases("data", name, verbs)
    masks = {
        "masks of another size": broken.masks_of_another_size(b.images, d / "small"),
        "masks with unknown labels": broken.masks_with_unknown_labels(b.images, d / "unknown"),
    }
    for name, folder in masks.items():
        out += _cases("data", name, _data_verbs(b.images, folder, b))
    return out


def _set(*path_and_value) -> Callable[[dict], None]:
    *path, value = path_and_value

    def change(plan: dict) -> None:
        target = plan
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def plan_cases(b: Base) -> list[Case]:
    d = b.root / "broken_plans"
    d.mkdir(exist_ok=True)
    good = json.loads(b.plan.read_text())
    layer, output = next(iter(good["keep"])), next(iter(good["outputs"]))
    relu = next(n.name for n in onnx.load(b.model).graph.node if n.op_type == "Relu")
    texts = {
        "malformed: not JSON": "keep: conv_3 [0, 1]",
        "malformed: truncated": b.plan.read_text()[:40],
        "malformed: a JSON list": "[1, 2]",
        "malformed: empty": "",
        "another model's sha256": b.plan.read_text().replace(good["model_sha256"], "0" * 64),
    }
    edits = {
        "another model's layers": _set("keep", {"conv_99": [0]}),
        "edited: index out of range": _set("keep", layer, [0, 64]),
        "edited: duplicate index": _set("keep", layer, [0, 0]),
        "edited: negative index": _set("keep", layer, [-1]),
        "edited: empty keep-set": _set("keep", layer, []),
        "edited: indices as strings": _set("keep", layer, ["0"]),
        "edited: unknown key": _set("kept", {}),
        "edited: wrong format": _set("format", "onnxcut.plan/2"),
        "edited: output axis": _set("outputs", output, "axis", 2),
        "edited: an unknown output": _set("outputs", {"logits": {"keep": [0]}}),
        "edited: a node without channels": _set("keep", {relu: [0]}),
    }
    plans = {
        name: broken.plan_text(d / f"{i}.json", t) for i, (name, t) in enumerate(texts.items())
    }
    plans |= {
        name: broken.plan_edit(b.plan, d / f"e{i}.json", e)
        for i, (name, e) in enumerate(edits.items())
    }
    out = []
    for name, p in plans.items():
        verbs = {
            "extract": ["extract", b.model, "--plan", p, "-o", f"{OUT}/cut.onnx"],
            "mask": ["mask", b.model, "--plan", p, "-o", f"{OUT}/masked.onnx"],
        }
        out += _cases("plan", name, verbs)
    foreign = broken.constant_model(d / "foreign.onnx")
    verbs = {"extract": ["extract", foreign, "--plan", b.plan_unsigned, "-o", f"{OUT}/cut.onnx"]}
    return out + _cases("plan", "a model without layers", verbs)


def _scores_verbs(s: Path, b: Base, model: Path) -> Verbs:
    classes = ["--classes", "1,2"]
    return {
        "plan": ["plan", s, "--model", model, *classes, "-o", f"{OUT}/p.json"],
        "extract --scores": ["extract", model, "--scores", s, *classes, "-o", f"{OUT}/cut.onnx"],
        "merge": ["merge", b.scores, s, "-o", f"{OUT}/merged.npz"],
    }


def scores_cases(b: Base, seed: int = 0) -> list[Case]:
    d = b.root / "broken_scores"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    with np.load(b.scores) as f:
        key = next(k for k in f.files if k.startswith("forward/"))

    def edit(name: str, change: Callable[[dict], None]) -> Path:
        return broken.scores_edit(b.scores, d / f"{name}.npz", change)

    files = {
        "malformed: text": broken.text(b.scores, d / "text.npz"),
        "malformed: zero-length": broken.zero_length(b.scores, d / "zero.npz"),
        "malformed: truncated": broken.truncated(b.scores, d / "cut.npz", rng),
        "malformed: pickled meta": broken.scores_with_pickle(b.scores, d / "pickle.npz"),
        "malformed: zip of text": broken.scores_zip_of_text(d / "zip.npz"),
        "malformed: meta not JSON": edit("meta", _set("meta", np.array("{"))),
        "edited: a layer one channel short": edit(
            "narrow", lambda a: a.update({key: a[key][:, 1:]})
        ),
        "edited: NaN scores": edit("nan", lambda a: a.update({key: a[key] * np.nan})),
        "edited: scores as strings": edit("str", lambda a: a.update({key: a[key].astype(str)})),
        "edited: a category name removed": edit(
            "cats", lambda a: a.update(categories=a["categories"][1:])
        ),
        "edited: counts of 3 categories": edit("count", lambda a: a.update(count=a["count"][1:])),
        "edited: format": broken.scores_meta_edit(b.scores, d / "format.npz", _set("format", "x")),
    }
    out = []
    for name, path in files.items():
        out += _cases("scores", name, _scores_verbs(path, b, b.model))
    verbs = _scores_verbs(b.scores, b, b.other)
    del verbs["merge"]
    return out + _cases("scores", "another model's scores", verbs)


def checkpoint_cases(b: Base) -> list[Case]:
    """--resume from an OUT.partial that is garbage (written by run_case, left as it was)."""
    data = ["--data", b.images, "--resume", *_QUICK]
    verbs = {
        "attribute --resume": ["attribute", b.model, *data, "-o", f"{OUT}/s.npz"],
        "distill --resume": ["distill", b.cut, "--teacher", b.model, *data, "-o", f"{OUT}/d.onnx"],
    }
    return _cases("checkpoint", "garbage OUT.partial", verbs)


def all_cases(b: Base, draws: int) -> list[Case]:
    return [
        *model_cases(b, draws),
        *data_cases(b),
        *plan_cases(b),
        *scores_cases(b),
        *checkpoint_cases(b),
    ]


@dataclass
class Result:
    case: Case
    exit_code: int
    lines: list[str]
    written: list[str]  # files created, changed or removed
    traceback: bool

    @property
    def passed(self) -> bool:
        one_line = len(self.lines) == 1 and self.lines[0].startswith("Error: ")
        return self.exit_code == 2 and not self.traceback and one_line and not self.written


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def run_case(case: Case, b: Base, out: Path) -> Result:
    """Run one case with the empty folder `out` for outputs; watch it and the base folder."""
    out.mkdir(parents=True)
    if case.group == "checkpoint":
        partial = "s.npz.partial" if case.verb.startswith("attribute") else "d.onnx.partial"
        (out / partial).write_text("garbage")
    before = {**_snapshot(b.root), **_snapshot(out)}
    outcome = invoke([a.replace(OUT, str(out)) for a in case.args])
    after = {**_snapshot(b.root), **_snapshot(out)}
    written = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    lines = [line for line in outcome.output.strip().splitlines() if line.strip()]
    return Result(case, outcome.exit_code, lines, written, outcome.traceback)


def table(results: Sequence[Result]) -> str:
    """One row per case: the verbs run, how many exited 2, printed one line, wrote nothing."""
    rows: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        rows.setdefault((r.case.group, r.case.name), []).append(r)
    lines = [
        "| input | case | verbs | exit 2 | one line | wrote nothing |",
        "|---|---|---|---|---|---|",
    ]
    for (group, name), rs in rows.items():
        n = len(rs)
        exit2 = sum(r.exit_code == 2 and not r.traceback for r in rs)
        one = sum(len(r.lines) == 1 for r in rs)
        clean = sum(not r.written for r in rs)
        verbs = ", ".join(r.case.verb for r in rs)
        lines.append(f"| {group} | {name} | {verbs} | {exit2}/{n} | {one}/{n} | {clean}/{n} |")
    return "\n".join(lines)
