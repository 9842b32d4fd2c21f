"""benchmarks/attribute_speed.py: its PyTorch reference gives onnxcut.attribute's scores."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxcut import AttributeOptions, attribute, data

from conftest import ROOT, sample_model

pytest.importorskip("torch", reason="the reference runs the ONNX graph in PyTorch")

spec = importlib.util.spec_from_file_location(
    "attribute_speed", ROOT / "benchmarks" / "attribute_speed.py"
)
bench = importlib.util.module_from_spec(spec)
sys.modules["attribute_speed"] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val" / "images"


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    # Three images at batch 2: one full batch and one partial.
    for p in data.list_images(SCENES)[:3]:
        shutil.copy(p, tmp_path / p.name)
    return tmp_path


def test_torch_graph_gives_onnxruntime_logits(scenes: Path) -> None:
    assert bench.forward_check(sample_model("deeplab_digits"), scenes, 1, 2)[0] <= 1e-4


def test_reference_scores_match_attribute(scenes: Path) -> None:
    model = sample_model("deeplab_digits")
    ours = attribute(model, scenes, AttributeOptions(threads=1, batch=2, tau=0.9))
    for grads in bench.GRADS:
        arrays, count = bench.reference_scores(model, scenes, 0.9, 2, grads)
        assert set(arrays) == set(ours.arrays)
        np.testing.assert_array_equal(count, ours.count)
        for key, array in arrays.items():
            np.testing.assert_allclose(array, ours.arrays[key], rtol=0, atol=1e-4, err_msg=key)


def test_unsupported_op_is_named() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    pool = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2])
    model = helper.make_model(helper.make_graph([pool], "g", [x], [y]))
    with pytest.raises(NotImplementedError, match="no rule for MaxPool"):
        bench.TorchGraph(model)
