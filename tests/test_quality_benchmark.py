"""benchmarks/quality.py: baselines sit at exactly the plan's per-group channel counts."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np

from conftest import ROOT, sample_model

spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality  # dataclasses look their module up there
spec.loader.exec_module(quality)


def test_plan_at_counts_keeps_top_channels_and_outputs() -> None:
    plan = {"keep": {"a": [0, 1], "b": [2]}, "outputs": {"y": {"axis": 1, "keep": [0, 3]}}}
    vectors = {"a": np.array([0.1, 0.5, 0.9, 0.2]), "b": np.array([3.0, 1.0, 2.0])}
    out = quality.plan_at_counts(plan, vectors)
    assert out["keep"] == {"a": [1, 2], "b": [0]}
    assert out["outputs"] == plan["outputs"]
    assert quality.plan_at_counts(plan, vectors, {"a": 3, "b": 1})["keep"]["a"] == [1, 2, 3]


def test_digit_subsets_are_nested_and_fixed() -> None:
    subsets = quality.digit_subsets([1, 2, 5])
    assert set(subsets[1]) <= set(subsets[2]) <= set(subsets[5])
    assert subsets == quality.digit_subsets([1, 2, 5])


def test_baselines_match_plan_counts(tmp_path: Path) -> None:
    sample_model("deeplab_digits")
    setup = quality.sample_setup(
        "deeplab_digits", shard="1/10", limit=16, latency_runs=2, distill=False
    )
    # The training split is not committed (make_data.py regenerates it); attribute a shard of
    # the validation split instead, so the check runs on a fresh clone too.
    setup = dataclasses.replace(setup, train=setup.images, train_masks=setup.masks)
    scores = quality.cached_scores(setup, tmp_path)
    classes = quality.categories(setup, (3, 5))
    rows = quality.compare(setup, scores, classes, tmp_path, seeds=1)
    plan = next(r["plan"] for r in rows if r["method"] == "disassembler")
    methods = [r["method"] for r in rows]
    assert methods == ["original", "disassembler", "l1", "random (x1)", *quality.BASELINES[2:]]
    for row in rows[2:]:
        assert row["plan"]["keep"].keys() == plan["keep"].keys()
        counts = {k: len(v) for k, v in row["plan"]["keep"].items()}
        assert counts == {k: len(v) for k, v in plan["keep"].items()}, row["method"]
        assert row["plan"]["outputs"] == plan["outputs"]
        assert row["flops"] == rows[1]["flops"] and row["params"] == rows[1]["params"]
        assert 0 <= row["metric"] <= 1
    assert rows[0]["metric_kept"] == 1.0
