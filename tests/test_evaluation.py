"""eval: segmentation and classification metrics, customised tasks, sub-network mapping."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcut.channels.surgery import extract
from onnxcut.cli.main import cli
from onnxcut.errors import DataError
from onnxcut.evaluation.metrics import EvalOptions, evaluate

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"
DIGITS = ROOT / "samples" / "data" / "digits_cls" / "val"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    for kind in ("images", "masks"):
        (root / kind).mkdir()
        copy_images(sorted((SCENES / kind).glob("*.png"))[:10], root / kind)
    return root


def _miou_by_hand(model: Path, scenes: Path, classes=None) -> float:
    """Recompute mIoU with a plain loop over the confusion matrix."""
    from onnxcut import data
    from onnxcut.graph.io import load
    from onnxcut.runtime import run

    proto = load(model)
    pre = data.fit_to_model(data.preprocess_from(proto), proto)
    inter, union = np.zeros(11), np.zeros(11)
    for path in sorted((scenes / "images").glob("*.png")):
        x = data.to_input(data.read_image(path, pre), pre)[None]
        logits = run(proto, {"input": x})["logits"][0]
        truth = cv2.imread(str(scenes / "masks" / path.name), cv2.IMREAD_UNCHANGED)
        if classes is not None:
            allowed = [0, *classes]
            pred = np.array(allowed)[logits[allowed].argmax(0)]
            truth = np.where(np.isin(truth, allowed), truth, 0)
        else:
            pred = logits.argmax(0)
        for k in range(11):
            inter[k] += ((pred == k) & (truth == k)).sum()
            union[k] += ((pred == k) | (truth == k)).sum()
    ks = [0, *classes] if classes is not None else [k for k in range(11) if union[k]]
    return float(np.mean([inter[k] / union[k] for k in ks if union[k]]))


def test_segmentation_miou_matches_hand_count(scenes: Path):
    model = sample_model("deeplab_digits")
    report = evaluate(
        model, scenes / "images", EvalOptions(masks=str(scenes / "masks"), latency_runs=2)
    )
    assert report["miou"] == pytest.approx(_miou_by_hand(model, scenes), abs=1e-9)
    assert {"miou", "per_class", "params", "flops", "latency_ms"} <= set(report)
    assert report["images"] == 10 and report["latency_ms"] > 0


def test_customised_task_and_subnetwork_mapping(scenes: Path, tmp_path: Path):
    model = sample_model("deeplab_digits")
    opts = EvalOptions(masks=str(scenes / "masks"), classes=(3, 5), latency_runs=2)
    original = evaluate(model, scenes / "images", opts)
    assert original["miou"] == pytest.approx(_miou_by_hand(model, scenes, (3, 5)), abs=1e-9)
    assert set(original["per_class"]) <= {"0", "3", "5"}
    # Keeping every channel but only background, 3 and 5 in the head gives the same scores.
    (head,) = [o.name for o in onnx.load(model).graph.output]
    sub = extract(
        model,
        {"format": "onnxcut.plan/1", "keep": {}, "outputs": {head: {"axis": 1, "keep": [0, 3, 5]}}},
    )
    onnx.save(sub, tmp_path / "sub.onnx")
    got = evaluate(tmp_path / "sub.onnx", scenes / "images", opts)
    assert got["miou"] == pytest.approx(original["miou"], abs=1e-9)
    assert got["flops"] < original["flops"]
    # Without --classes a sub-network is scored on the categories it kept.
    unspecified = evaluate(
        tmp_path / "sub.onnx",
        scenes / "images",
        EvalOptions(masks=str(scenes / "masks"), latency_runs=2),
    )
    assert unspecified["miou"] == pytest.approx(original["miou"], abs=1e-9)
    # Without its metadata the sub-network's 3 outputs cannot be mapped back.
    del sub.metadata_props[:]
    onnx.save(sub, tmp_path / "bare.onnx")
    with pytest.raises(DataError, match=r"onnxcut\.categories"):
        evaluate(
            tmp_path / "bare.onnx",
            scenes / "images",
            EvalOptions(masks=str(scenes / "masks"), latency_runs=1),
        )


def test_missing_masks_are_counted(scenes: Path, tmp_path: Path):
    masks = tmp_path / "masks"
    masks.mkdir()
    copy_images(sorted((scenes / "masks").glob("*.png"))[:6], masks)
    report = evaluate(
        sample_model("deeplab_digits"),
        scenes / "images",
        EvalOptions(masks=str(masks), latency_runs=1),
    )
    assert (report["images"], report["images_without_mask"]) == (6, 4)


def test_classification_top1():
    model = sample_model("resnet_digits_cls")
    report = evaluate(model, DIGITS, EvalOptions(latency_runs=2, limit=None))
    assert report["task"] == "classify" and 0.5 < report["top1"] <= 1
    chosen = evaluate(model, DIGITS, EvalOptions(classes=(4, 8), latency_runs=1))
    assert set(chosen["per_class"]) == {"4", "8"} and chosen["top1"] >= report["top1"] - 0.2


def test_cli_eval_json_and_bad_classes(scenes: Path):
    model = str(sample_model("deeplab_digits"))
    args = [
        "eval",
        model,
        "--data",
        str(scenes / "images"),
        "--masks",
        str(scenes / "masks"),
        "--runs",
        "2",
    ]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert {"miou", "per_class", "params", "flops", "latency_ms"} <= set(json.loads(result.output))
    bad = CliRunner().invoke(cli, [*args, "--classes", "3,42"])
    assert bad.exit_code == 2 and "42" in bad.output
    no_masks = CliRunner().invoke(cli, ["eval", model, "--data", str(scenes / "images")])
    assert no_masks.exit_code == 2 and "--masks" in no_masks.output
