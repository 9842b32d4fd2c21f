"""attribute, extract, distill and eval on the CUDA and TensorRT execution providers.

These run only where onnxruntime-gpu sees a GPU (benchmarks/gpu_check.sh runs them there);
elsewhere they skip with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.cli.main import cli

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"
MODEL = "deeplab_digits"


def _providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


needs_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in _providers(),
    reason="no CUDA execution provider here (onnxruntime-gpu on a machine with a GPU)",
)
needs_tensorrt = pytest.mark.skipif(
    "TensorrtExecutionProvider" not in _providers(),
    reason="no TensorRT execution provider here (onnxruntime-gpu with TensorRT libraries)",
)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_images")
    copy_images(sorted((SCENES / "images").glob("*.png"))[:12], root)
    return root


def _cli(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def student(images: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_student")
    scores, out = folder / "scores.npz", folder / "student.onnx"
    _cli("attribute", sample_model(MODEL), "--data", images, "-o", scores, "--tau", 0.7)
    _cli("extract", sample_model(MODEL), "--scores", scores, "--classes", "3,5", "-o", out)
    return out


@needs_cuda
def test_cuda_attribution_matches_cpu(images: Path):
    """Same images and masks; GPU kernels round differently, so close, not bit-identical."""
    cpu = attribute(sample_model(MODEL), images, AttributeOptions(tau=0.7, batch=4))
    gpu = attribute(
        sample_model(MODEL), images, AttributeOptions(tau=0.7, batch=4, provider="cuda")
    )
    np.testing.assert_array_equal(cpu.count, gpu.count)
    for key in cpu.arrays:
        np.testing.assert_allclose(gpu.arrays[key], cpu.arrays[key], atol=2e-3, err_msg=key)


@needs_cuda
def test_cuda_distill_and_eval(images: Path, student: Path, tmp_path: Path):
    out = tmp_path / "distilled.onnx"
    teacher = sample_model(MODEL)
    _cli("distill", student, "--teacher", teacher, "--data", images, "-o", out,
         "--batch", 4, "--provider", "cuda")  # fmt: skip
    masks = SCENES / "masks"
    found = json.loads(
        _cli("eval", out, "--data", images, "--masks", masks, "--provider", "cuda", "--json")
    )
    assert 0.0 <= found["miou"] <= 1.0


@needs_tensorrt
def test_tensorrt_runs_an_extracted_model(student: Path):
    from onnxcut.runtime import session

    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    name = session(student, "cpu").get_inputs()[0].name
    cpu = session(student, "cpu").run(None, {name: x})[0]
    trt = session(student, "tensorrt").run(None, {name: x})[0]
    np.testing.assert_allclose(trt, cpu, atol=1e-2)
