"""Images/s of one distillation training step: onnxcut's ONNX trainer vs PyTorch eager.

    python benchmarks/train_speed.py --threads 2

Builds the DeepLab-style sample architecture (batch 16, 64x64) and a ResNet-18-sized
classifier (batch 8, 224x224) in torch with random weights (inference-mode BatchNorm, as
onnxcut trains), exports each to ONNX, then times one training step on the same weights,
batch, thread count and optimizer (Adam, lr 1e-4), the loss being the KL divergence to a
fixed teacher target:
  onnxcut   Trainer.step: one onnxruntime run of forward, loss, every parameter's gradient
            and the Adam update, weights kept in OrtValues between steps
  torch     eager forward, loss, backward, torch.optim.Adam.step
and prints onnxcut/torch (target >= 1.0). It also prints the compute bound on that ratio:
a step needs the forward MACs, an input-gradient convolution per Conv that does not read
the image, and a weight-gradient correlation per Conv and Gemm, each of its forward MACs;
running them all at onnxruntime's forward rate is the best any step built of onnxruntime
kernels can do on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from grad_throughput import ResNet18, _deeplab, _macs, _timed
from torch import nn
from torch.nn import functional as F

from onnxcut.attribution.probe import find_head
from onnxcut.graph.io import load
from onnxcut.runtime import session
from onnxcut.train import Optimizer, build, trainable
from onnxcut.train.graph import WEIGHTS
from onnxcut.train.losses import SCALE, TARGET
from onnxcut.train.trainer import Trainer


def _torch_step(net: nn.Module, opt: torch.optim.Optimizer, x, target, positions: int):
    opt.zero_grad(set_to_none=True)
    logp = F.log_softmax(net(x), dim=1)
    loss = F.kl_div(logp, target, reduction="sum") / positions
    loss.backward()
    opt.step()
    return loss.item()


def bench(name: str, net: nn.Module, shape: tuple[int, ...], threads: int, repeat: int) -> None:
    torch.manual_seed(0)
    net.eval()  # inference-mode BatchNorm: running statistics stay, as in onnxcut
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        torch.onnx.export(
            net, (x,), str(path), input_names=["input"], output_names=["out"],
            opset_version=17, dynamo=False,
        )  # fmt: skip
        model = load(onnx.load(str(path)))
    head = find_head(model)
    out = session(model, threads=threads).run([head.output], {"input": x.numpy()})[0]
    rng = np.random.default_rng(0)
    target = rng.random(out.shape).astype(np.float32)
    target /= target.sum(axis=1, keepdims=True)
    positions = target.size // target.shape[1]
    params = trainable(model)
    optimizer = Optimizer("adam", 1e-4)
    graph = build(model, head.score, head.axis, params, optimizer=optimizer, batch=shape[0])
    initial = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    trainer = Trainer(graph, initial, optimizer, threads=threads)
    feeds = {
        "input": x.numpy(),
        TARGET: target,
        SCALE: np.float32(1.0 / positions),
        WEIGHTS: np.ones(shape[0], np.float32),
    }
    torch.set_num_threads(threads)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    tt = torch.from_numpy(target)
    fwd = session(model, threads=threads)
    t = _timed(
        {
            "ours": lambda: trainer.step(feeds),
            "torch": lambda: _torch_step(net, opt, x, tt, positions),
            "fwd": lambda: fwd.run(None, {"input": x.numpy()}),
        },
        repeat,
        0.3,
    )
    fwd_macs, input_grad_macs = _macs(model)
    weight_grad_macs = fwd_macs  # one correlation per layer, of its forward MACs
    rate = fwd_macs / t["fwd"]
    bound = t["torch"] / ((fwd_macs + input_grad_macs + weight_grad_macs) / rate)
    n = shape[0]
    print(f"\n{name}: batch {shape}, {len(params)} trained tensors, {threads} threads")
    for label, key in (("onnxcut Trainer.step", "ours"), ("torch eager + Adam", "torch")):
        print(f"  {label:22s} {n / t[key]:8.1f} images/s  ({t[key] * 1000:7.1f} ms/step)")
    print(f"  onnxcut / torch eager   {t['torch'] / t['ours']:5.2f}x  (target >= 1.0)")
    print(
        f"  MACs per step: forward {fwd_macs / 1e9:.2f} G, input gradients "
        f"{input_grad_macs / 1e9:.2f} G, weight gradients {weight_grad_macs / 1e9:.2f} G; "
        f"onnxruntime forward runs {rate / 1e9:.1f} GMAC/s"
    )
    print(f"  compute bound on onnxcut / torch eager: {bound:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--only", choices=["deeplab", "resnet18"])
    args = p.parse_args()
    if args.only in (None, "deeplab"):
        bench("deeplab", _deeplab(), (16, 3, 64, 64), args.threads, args.repeat)
    if args.only in (None, "resnet18"):
        bench("resnet18", ResNet18(), (8, 3, 224, 224), args.threads, args.repeat)


if __name__ == "__main__":
    main()
