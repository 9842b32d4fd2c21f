"""Train the sample models on CPU and export them to samples/models/*.onnx (opset 17).

Every ONNX file has input "input" (N x 3 x H x W float32, dynamic N), output "logits", and its
preprocessing as JSON in metadata_props["onnxcut.preprocess"]. Exports are checked with
onnx.checker and against onnxruntime before they are written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

SAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(SAMPLES))

import make_data  # noqa: E402
import nets  # noqa: E402

SEED = 0
OPSET = 17
PREPROCESS_KEY = "onnxcut.preprocess"
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]
SCALE = 1.0 / 255.0


@dataclass(frozen=True)
class Spec:
    name: str
    build: type[nn.Module]
    task: str  # "seg" or "cls"
    epochs: int
    lr: float
    keep_bn: bool = False  # export BatchNormalization unfolded
    batch: int = 32
    # too large to commit (> 10 MB): trained only when named in --models, or by ensure_model()
    on_demand: bool = False


SPECS = {
    s.name: s
    for s in [
        Spec("unet_digits", nets.UNet, "seg", 5, 3e-3, keep_bn=True, batch=16),
        Spec("deeplab_digits", nets.DeepLab, "seg", 6, 3e-3),
        Spec("mobilenet_digits_seg", nets.MobileNetSeg, "seg", 15, 5e-3),
        Spec("resnet_digits_cls", nets.ResNetCls, "cls", 12, 3e-3),
        Spec("vgg_digits_cls", nets.VGGCls, "cls", 10, 2e-3),
        Spec("deeplab_wide_digits", nets.DeepLabWide, "seg", 4, 2e-3, on_demand=True),
    ]
}


def preprocess_meta(task: str) -> dict:
    size = make_data.SCENE_SIZE if task == "seg" else make_data.CLS_SIZE
    return {
        "size": [size, size],
        "layout": "nchw",
        "channels": "rgb",
        "scale": SCALE,
        "mean": MEAN,
        "std": STD,
    }


def preprocess(rgb: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 RGB -> normalised float32 N x 3 x H x W, as stored in metadata."""
    x = rgb.astype(np.float32) * np.float32(SCALE)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def load_split(data: Path, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC RGB) and targets (masks N x H x W or class ids N)."""
    if task == "seg":
        root = data / "digit_scenes" / split
        paths = sorted((root / "images").glob("*.png"))
        masks = [cv2.imread(str(root / "masks" / p.name), cv2.IMREAD_UNCHANGED) for p in paths]
        targets = np.stack(masks).astype(np.int64)
    else:
        root = data / "digits_cls" / split
        paths = sorted(root.glob("*/*.png"), key=lambda p: (int(p.parent.name), p.name))
        targets = np.array([int(p.parent.name) for p in paths], dtype=np.int64)
    if not paths:
        raise FileNotFoundError(f"no images under {root}")
    return np.stack([read_rgb(p) for p in paths]), targets


def ensure_data(data: Path) -> None:
    missing = [
        s
        for s in ("train", "val")
        if not (data / "digit_scenes" / s / "images").is_dir()
        or not (data / "digits_cls" / s).is_dir()
    ]
    if missing:
        make_data.generate(data, missing)


def seg_metrics(conf: np.ndarray) -> dict[str, float]:
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / np.maximum(union, 1)
    return {"miou": float(iou.mean()), "pixel_acc": float(tp.sum() / conf.sum())}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> dict[str, float]:
    model.eval()
    preds = torch.cat([model(xb).argmax(1) for xb in x.split(64)])
    if task == "cls":
        return {"top1": float((preds == y).float().mean())}
    k = nets.NUM_SEG_CLASSES
    conf = torch.bincount(y.flatten() * k + preds.flatten(), minlength=k * k).reshape(k, k)
    return seg_metrics(conf.numpy())


def train(spec: Spec, data: Path, epochs: int) -> tuple[nn.Module, dict]:
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # noqa: NPY002 - seeds any legacy global-RNG use downstream
    x_train, y_train = load_split(data, spec.task, "train")
    x_val, y_val = load_split(data, spec.task, "val")
    x_train, x_val = preprocess(x_train), preprocess(x_val)
    y_train, y_val = torch.from_numpy(y_train), torch.from_numpy(y_val)
    model = spec.build()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    batch = spec.batch
    steps = epochs * ((len(x_train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(SEED)
    for epoch in range(epochs):
        model.train()
        t0, total = time.time(), 0.0
        for idx in torch.randperm(len(x_train), generator=gen).split(batch):
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        metrics = evaluate(model, x_val, y_val, spec.task)
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(
            f"[{spec.name}] epoch {epoch + 1}/{epochs} loss={total / len(x_train):.4f} "
            f"val {shown} ({time.time() - t0:.0f}s)",
            flush=True,
        )
    return model.eval(), metrics


def inline_identity_initializers(model: onnx.ModelProto) -> int:
    """The TorchScript exporter dedupes equal initializers (e.g. BN gamma == running_var)
    behind Identity nodes; give each consumer its own initializer so the graph stays plain."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    for node in nodes:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return len(nodes)


def export(model: nn.Module, spec: Spec, path: Path, x_check: torch.Tensor) -> onnx.ModelProto:
    mode = torch.onnx.TrainingMode.PRESERVE if spec.keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        # The legacy exporter is deprecated but still the one that emits a plain op graph.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # PRESERVE on an eval-mode model exports inference BN; folding only touches constants.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        torch.onnx.export(
            model,
            (x_check[:1],),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            training=mode,
            do_constant_folding=True,
        )
    onnx_model = onnx.load(str(path))
    if n_inlined := inline_identity_initializers(onnx_model):
        print(f"[{spec.name}] replaced {n_inlined} Identity(initializer) nodes")
    onnx.helper.set_model_props(
        onnx_model, {PREPROCESS_KEY: json.dumps(preprocess_meta(spec.task))}
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.save(onnx_model, str(path))
    verify(onnx_model, model, spec, path, x_check)
    return onnx_model


def verify(
    onnx_model: onnx.ModelProto, model: nn.Module, spec: Spec, path: Path, x: torch.Tensor
) -> None:
    ops = Counter(n.op_type for n in onnx_model.graph.node)
    n_bn = ops.get("BatchNormalization", 0)
    if spec.keep_bn != (n_bn > 0):
        raise RuntimeError(f"{spec.name}: {n_bn} BatchNormalization nodes, keep_bn={spec.keep_bn}")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    diff = float(np.abs(got - want).max())
    if got.shape != want.shape or diff > 1e-4:
        raise RuntimeError(f"{spec.name}: onnxruntime mismatch {got.shape} max|diff|={diff:.2e}")
    size_kb = path.stat().st_size / 1024
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[{spec.name}] exported {path.name} {size_kb:.0f} KiB, {n_params} params, "
        f"ort max|diff|={diff:.1e}"
    )
    print(f"[{spec.name}] ops: {dict(sorted(ops.items()))}")


def build(name: str, data: Path, out: Path, epochs: int | None = None) -> dict[str, float]:
    """Train one model, export it to out/<name>.onnx, and return its final val metrics."""
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    ensure_data(data)
    out.mkdir(parents=True, exist_ok=True)
    spec = SPECS[name]
    model, metrics = train(spec, data, epochs or spec.epochs)
    x_val, _ = load_split(data, spec.task, "val")
    export(model, spec, out / f"{name}.onnx", preprocess(x_val[:3]))
    return metrics


def ensure_model(name: str, data: Path = SAMPLES / "data", out: Path = SAMPLES / "models") -> Path:
    """out/<name>.onnx, trained and exported first when missing (the on-demand samples)."""
    path = out / f"{name}.onnx"
    if not path.exists():
        try:
            build(name, data, out)
        except BaseException:
            path.unlink(missing_ok=True)  # an export that failed its checks
            raise
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    committed = ",".join(n for n, s in SPECS.items() if not s.on_demand)
    parser.add_argument(
        "--models", default=committed, help=f"comma-separated model names (default {committed})"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override per-model epochs")
    parser.add_argument("--data", type=Path, default=SAMPLES / "data")
    parser.add_argument("--out", type=Path, default=SAMPLES / "models")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(SPECS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(SPECS)}")
    summary = {name: build(name, args.data, args.out, args.epochs) for name in names}
    for name, metrics in summary.items():
        print(f"[summary] {name}: " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
