"""FLOPs and parameter budgets: plans land at or just under a share of the original."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcut.attribution import AttributeOptions, Selection, attribute, make_plan, save_scores
from onnxcut.attribution.budget import normalise
from onnxcut.channels import extract, summarize
from onnxcut.cli.main import cli
from onnxcut.errors import DataError
from onnxcut.graph.io import load
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val" / "images"
SEG = "deeplab_digits"


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scenes")
    copy_images(sorted(SCENES.glob("*.png"))[:12], folder)
    return attribute(sample_model(SEG), folder, AttributeOptions(tau=0.7, batch=4))


def _share(model, plan, measure: str) -> float:
    def size(m):
        m = load(m)
        if default_batch_inplace(m):
            m = infer_shapes(m)
        return summarize(m)[measure]

    return size(extract(model, plan)) / size(model)


@pytest.mark.parametrize(("measure", "share"), [("flops", 0.5), ("flops", 0.3), ("params", 0.5)])
def test_budget_lands_within_two_percent_below(scores, measure, share):
    model = load(sample_model(SEG))
    plan = make_plan(model, scores, Selection((4, 6), **{measure: share}))
    reached = _share(model, plan, measure)
    assert share - 0.02 <= reached <= share, reached
    assert plan["selection"][f"{measure}_reached"] == pytest.approx(reached, abs=1e-6)
    assert plan["outputs"]  # the head is still cut to background and the chosen digits


def test_budget_with_round_to_keeps_multiples(scores):
    from onnxcut.channels import trace

    model = load(sample_model(SEG))
    plan = make_plan(model, scores, Selection((4, 6), flops=0.5, round_to=8))
    groups = trace(model)
    for layer, kept in plan["keep"].items():
        assert len(kept) % 8 == 0 or len(kept) == groups.group_of(layer).channels, layer
    assert _share(model, plan, "flops") <= 0.5


def test_normalise_is_relative_to_the_layer_mean():
    np.testing.assert_allclose(normalise(np.array([1.0, 3.0])), [0.5, 1.5])
    assert not normalise(np.zeros(3)).any()


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_budget_outside_the_unit_interval_is_refused(scores, share):
    with pytest.raises(DataError, match=r"0 < flops <= 1"):
        make_plan(load(sample_model(SEG)), scores, Selection((4,), flops=share))


def test_unreachable_budget_names_the_smallest(scores, tmp_path: Path):
    path = tmp_path / "s.npz"
    save_scores(scores, path)
    out = tmp_path / "p.json"
    args = ["plan", str(path), "--model", str(sample_model(SEG)), "--classes", "4", "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--flops", "0.001"])
    assert result.exit_code == 2, result.output
    assert "smallest reachable is 0.0" in result.output and not out.exists()
    result = CliRunner().invoke(cli, [*args, "--flops", "2"])
    assert result.exit_code == 2 and "0 < flops <= 1" in result.output and not out.exists()
    result = CliRunner().invoke(cli, [*args, "--flops", "0.5"])
    assert result.exit_code == 0, result.output
    assert "flops kept: 0.49" in result.output or "flops kept: 0.500" in result.output


def test_agreement_of_a_model_with_itself_is_one(tmp_path: Path):
    from onnxcut.attribution.agreement import agreement

    folder = tmp_path / "few"
    folder.mkdir()
    copy_images(sorted(SCENES.glob("*.png"))[:3], folder)
    assert agreement(sample_model(SEG), sample_model(SEG), folder, [0, 5, 7]) == 1.0
    with pytest.raises(DataError, match="does not output categories"):
        plan = {"format": "onnxcut.plan/1", "keep": {}, "outputs": {}}
        model = load(sample_model(SEG))
        plan["outputs"] = {model.graph.output[0].name: {"axis": 1, "keep": [0, 5]}}
        agreement(extract(model, plan), model, folder, [0, 5, 7])


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("held_out")
    copy_images(sorted(SCENES.glob("*.png"))[100:124], folder)
    return folder


def test_min_agreement_finds_a_smaller_plan_that_agrees(scores, held_out: Path, tmp_path):
    from onnxcut.attribution.agreement import AgreementCheck, agreement

    path = tmp_path / "s.npz"
    save_scores(scores, path)
    out = tmp_path / "sub.onnx"
    args = ["extract", str(sample_model(SEG)), "--scores", str(path), "--classes", "4,6"]
    result = CliRunner().invoke(
        cli, [*args, "--min-agreement", "0.8", "--data", str(held_out), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    said = "agreement with the original on --data (its 0.95 bootstrap lower bound): 0."
    assert said in result.output
    sub = load(out)
    meta = json.loads({p.key: p.value for p in sub.metadata_props}["onnxcut.selection"])
    assert meta["min_agreement"] == 0.8 and meta["agreement"] >= 0.8 and meta["flops"] < 1
    assert meta["confidence"] == 0.95
    # The guard compared the bound, which lies below the agreement on the images themselves.
    check = AgreementCheck(load(sample_model(SEG)), held_out, [0, 4, 6], background=0)
    assert check.lower_bound(sub, 0.95) == pytest.approx(meta["agreement"], abs=1e-6)
    on_images = agreement(sub, sample_model(SEG), held_out, [0, 4, 6], background=0)
    assert on_images > meta["agreement"]
    # --confidence 0: the agreement on --data alone, as before there was a bound.
    alone = tmp_path / "alone.onnx"
    result = CliRunner().invoke(
        cli,
        [*args, "--min-agreement", "0.8", "--data", str(held_out), "--confidence", "0",
         "-o", str(alone)],
    )  # fmt: skip
    assert "agreement with the original on --data: 0." in result.output, result.output
    meta = json.loads({p.key: p.value for p in load(alone).metadata_props}["onnxcut.selection"])
    assert "confidence" not in meta
    assert agreement(load(alone), sample_model(SEG), held_out, [0, 4, 6], background=0) == (
        pytest.approx(meta["agreement"], abs=1e-6)
    )


def test_min_agreement_errors(scores, held_out: Path, tmp_path: Path):
    path = tmp_path / "s.npz"
    save_scores(scores, path)
    out = tmp_path / "p.json"
    args = ["plan", str(path), "--model", str(sample_model(SEG)), "--classes", "4", "-o", str(out)]
    result = CliRunner().invoke(cli, [*args, "--min-agreement", "0.9"])
    assert result.exit_code == 2 and "--min-agreement needs --data" in result.output
    result = CliRunner().invoke(cli, [*args, "--min-agreement", "1.0", "--data", str(held_out)])
    assert result.exit_code == 2, result.output
    assert "short of the whole model" in result.output and not out.exists()
    full = [*args, "--min-agreement", "1.0", "--data", str(held_out), "--allow-full"]
    result = CliRunner().invoke(cli, full)
    assert result.exit_code == 0 and "bootstrap lower bound): 1.0000" in result.output
    out.unlink()
    for extra, said in [
        (["--min-agreement", "0.9", "--data", str(held_out), "--confidence", "1.5"],
         "--confidence 1.5: a probability"),
        (["--confidence", "0.9"], "give --min-agreement"),
    ]:  # fmt: skip
        result = CliRunner().invoke(cli, [*args, *extra])
        assert result.exit_code == 2 and said in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_sensitivity_allocation_beats_uniform_at_half_the_flops(scores, held_out: Path):
    """Measured per-group sensitivity spends the budget where it costs least: at half the
    FLOPs its sub-network agrees with the original more than a uniform cut does."""
    from onnxcut.attribution.agreement import AgreementCheck

    model = load(sample_model(SEG))
    check = AgreementCheck(model, held_out, [0, 4, 6])
    with pytest.raises(DataError, match="measures on images: pass --data"):
        make_plan(model, scores, Selection((4, 6), flops=0.5, allocate="sensitivity"))
    plans = {
        how: make_plan(model, scores, Selection((4, 6), flops=0.5, allocate=how), check=check)
        for how in ("uniform", "sensitivity")
    }
    assert plans["sensitivity"]["selection"]["allocation"] == "sensitivity"
    assert (
        make_plan(model, scores, Selection((4, 6), flops=0.5), check=check) == plans["sensitivity"]
    )  # the default with images, measured once (cached on the check)
    for plan in plans.values():
        assert 0.48 <= _share(model, plan, "flops") <= 0.5
    got = {how: check(extract(model, plan)) for how, plan in plans.items()}
    assert got["sensitivity"] > got["uniform"], got
