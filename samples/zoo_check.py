"""Run onnxcut end to end on torchvision architectures exported from PyTorch.

    python samples/zoo_check.py [--size 96] [--models resnet18,seg:fcn_resnet50,...]

Each architecture is built with random weights (no download), exported with the
TorchScript exporter (opset 17, batch 1; `--dynamo`: the torch.export-based exporter at
opset 18, which needs onnxscript), then: inspect (parameters, MACs, prunable share),
attribute over four random images, plan for one or two categories the images reached,
extract, and compare the extracted model with the masked one on the kept outputs. A row
per model: the prunable share, the kept share of parameters and MACs, the largest relative
difference (exact: within 1e-4 of the output's range), or the one-line error onnxcut gave.
With `--distill`, the extracted model is then trained against the original for two epochs
over the four images (batch 2, lr 1e-3, `--hints 1`) and the row adds the mean loss of the
first and last epoch (random weights and four steps: a check that training runs on the
architecture, not of what it learns). Exit status 1 when an extracted model does not match
or anything crashes.

Needs `pip install -e '.[samples]' torchvision pillow` (and for `--keras`, keras and
onnxscript: Keras runs on its torch backend here and exports through torch.onnx).
torchvision's wheels here are built for a newer torch than the pinned CPU build, so its C
extension does not load; the shim below defines the two operators its Python side registers
fake kernels for, which is all the model zoo needs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.selection import Selection, make_plan
from onnxcut.channels.inspection import summarize
from onnxcut.channels.surgery import extract, mask
from onnxcut.errors import OnnxcutError
from onnxcut.graph.io import load
from onnxcut.graph.shapes import dims, graph_inputs
from onnxcut.runtime import run
from onnxcut.train import DistillOptions, distill

_SHIM = torch.library.Library("torchvision", "DEF")
for _schema in (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
):
    with contextlib.suppress(RuntimeError):  # a matching torchvision build defined it
        _SHIM.define(_schema)
import torchvision.models as zoo  # noqa: E402
import torchvision.models.segmentation as seg_zoo  # noqa: E402

MODELS = (
    "resnet18,resnext50_32x4d,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,"
    "efficientnet_v2_s,regnet_x_400mf,regnet_y_400mf,mnasnet0_5,shufflenet_v2_x0_5,"
    "squeezenet1_1,densenet121,googlenet,convnext_tiny,seg:lraspp_mobilenet_v3_large,"
    "seg:deeplabv3_mobilenet_v3_large,seg:fcn_resnet50,seg:deeplabv3_resnet50"
)
# With --keras: keras.applications models (NHWC input, Softmax head), Keras' ONNX export.
KERAS_MODELS = "keras:MobileNetV2,keras:ResNet50,keras:EfficientNetB0"


class _Logits(torch.nn.Module):
    """torchvision's segmenters return a dict; export its 'out' tensor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def _build(name: str) -> torch.nn.Module:
    if name.startswith("seg:"):
        net = getattr(seg_zoo, name[4:])(
            weights=None, weights_backbone=None, num_classes=5, aux_loss=False
        )
        return _Logits(net)
    return getattr(zoo, name)(weights=None, num_classes=10)


def _export_keras(name: str, path: Path, size: int) -> None:
    """A keras.applications model (NHWC, Softmax head) through Keras' own ONNX export."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.utils.set_random_seed(0)
    net = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3), classes=10)
    net(np.zeros((1, size, size, 3), np.float32))  # Keras exports only a model that has run
    net.export(str(path), format="onnx", verbose=False)


def _distilled(cut, model, images: Path) -> str:
    """Two epochs of distill with feature hints; the first and last epoch's mean loss."""
    reports = []
    opts = DistillOptions(batch=2, epochs=2, lr=1e-3, hints=1.0, threads=2)
    distill(cut, model, images, opts, on_epoch=reports.append)
    first, last = reports[0].loss, reports[-1].loss
    return f"distill loss {first:.4g} -> {last:.4g}"


def _check(name: str, folder: Path, images: Path, size: int, dynamo: bool, train: bool) -> str:
    path = folder / f"{name.replace(':', '_')}.onnx"
    torch.manual_seed(0)
    if name.startswith("keras:"):
        _export_keras(name[6:], path, size)
    else:
        torch.onnx.export(
            _build(name).eval(), (torch.randn(1, 3, size, size),), str(path),
            input_names=["input"], output_names=["out"], opset_version=18 if dynamo else 17,
            dynamo=dynamo,
        )  # fmt: skip
    image = graph_inputs(load(path))[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in dims(image)]
    model = load(path, {image.name: shape})  # Keras exports a dynamic batch: count for 1
    out = model.graph.output[0].name
    before = summarize(model)
    scores = attribute(path, images, AttributeOptions(tau=1e-6))
    reached = [k for k in range(len(scores.categories)) if scores.count[k] > 0]
    segment = name.startswith("seg:")
    classes = tuple((reached[1:] if segment and len(reached) > 1 else reached)[:2])
    plan = make_plan(
        model,
        scores,
        Selection(classes=classes, background=0 if segment else None),
    )
    cut = extract(model, plan)
    after = summarize(cut)
    x = {image.name: np.random.default_rng(1).standard_normal(shape, np.float32)}
    got, want = run(cut, x)[out], run(mask(model, plan), x)[out]
    keep = plan["outputs"].get(out, {}).get("keep")
    if keep is not None:
        want = np.take(want, keep, axis=1)
    err = float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))
    verdict = "exact" if err < 1e-4 else "MISMATCH"
    flops = f"{after['flops'] / before['flops']:.2f}" if before["flops"] and after["flops"] else "?"
    row = (
        f"{before['prunable_param_share']:.2f} prunable, classes {list(classes)}: params "
        f"{after['params'] / before['params']:.2f}, MACs {flops}, {verdict} ({err:.1e})"
    )
    return f"{row}; {_distilled(cut, model, images)}" if train else row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument(
        "--dynamo", action="store_true", help="torch.export-based exporter (needs onnxscript)"
    )
    parser.add_argument(
        "--distill", action="store_true", help="also distill each extracted model (hints on)"
    )
    parser.add_argument(
        "--keras", action="store_true", help=f"also {KERAS_MODELS} (needs keras, onnxscript)"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="onnxcut-zoo-") as tmp:
        folder, images = Path(tmp), Path(tmp) / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
            cv2.imwrite(str(images / f"{i}.png"), pixels)
        names = args.models.split(",") + (KERAS_MODELS.split(",") if args.keras else [])
        for name in names:
            start = time.perf_counter()
            try:
                row = _check(name, folder, images, args.size, args.dynamo, args.distill)
                failures += "MISMATCH" in row
            except OnnxcutError as e:  # a user-facing refusal, reported as the user sees it
                row = f"onnxcut: {e}"
            print(f"{name:34s} {row}  [{time.perf_counter() - start:.1f} s]", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
