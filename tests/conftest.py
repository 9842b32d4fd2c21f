"""Shared fixtures: tiny models built in code, saved under tmp_path, and the sample models."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import onnx
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

from netbuilder import NetBuilder

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS = ROOT / "samples" / "models"
SAMPLE_NAMES = [
    "unet_digits",
    "deeplab_digits",
    "resnet_digits_cls",
    "vgg_digits_cls",
    "mobilenet_digits_seg",
]


def copy_images(paths: Iterable[Path], folder: Path) -> Path:
    """Copy image files into `folder` (made if missing) under their own names; return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    return folder


def conv_bn_net(**builder_args) -> onnx.ModelProto:
    """conv-bn-relu -> residual -> pool -> gap -> gemm: a small classifier."""
    b = NetBuilder((1, 3, 16, 16), **builder_args)
    x = b.relu(b.bn(b.conv(b.input, 8)))
    y = b.relu(b.bn(b.conv(x, 8)))
    x = b.maxpool(b.add(x, y))
    return b.build([b.gemm(b.flatten(b.gap(x)), 10)])


@pytest.fixture
def conv_bn(tmp_path: Path) -> Path:
    path = tmp_path / "conv_bn.onnx"
    onnx.save(conv_bn_net(), path)
    return path


def sample_model(name: str) -> Path:
    path = SAMPLE_MODELS / f"{name}.onnx"
    # The samples are committed: a missing one is a broken checkout, not a reason to skip.
    assert path.exists(), f"{path} missing: run `python samples/train.py` to make it"
    return path


# CI replays the same examples every run; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
