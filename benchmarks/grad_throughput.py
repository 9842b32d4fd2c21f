"""Images/s for activations + gradients of every Conv output: onnxcut vs PyTorch eager.

    python benchmarks/grad_throughput.py --threads 2

Builds a ResNet-18-sized classifier (batch 8, 224x224) and the DeepLab-style sample
architecture (batch 8, 64x64) in torch with random weights, exports each to ONNX, then times,
on the same weights and thread count:
  onnxcut   GradientSession.run: forward + backward, activations and dS/dF of every Conv
  torch     eager autograd with forward hooks calling retain_grad, parameters frozen
  forward   onnxruntime forward only (the same exported model)
and prints onnxcut/torch and onnxcut/forward ratios (targets: >= 1.5 and >= 0.40).
`--profile` adds onnxcut's kernel time per op type, forward and backward part.

It also prints the compute bound on the first ratio: the backward pass needs one input-gradient
convolution per Conv that does not read the image, with the forward Conv's MACs. Running all
forward and backward MACs at the rate onnxruntime's forward pass reaches, with nothing else,
would take (forward MACs + backward MACs) / forward rate; torch's time over that is the best
ratio any backward graph made of onnxruntime's convolutions can show on this machine.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from onnxcut.channels.inspection import layers
from onnxcut.grad import GradientSession
from onnxcut.graph.io import load
from onnxcut.runtime import session

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 layout: 7x7 stem, max pool, 4 stages of 2 basic blocks."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(
            torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)
        )


def _deeplab() -> nn.Module:
    spec = importlib.util.spec_from_file_location("sample_nets", ROOT / "samples" / "nets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DeepLab()


def _timed(fns: dict, repeat: int, gap: float) -> dict[str, float]:
    """Median seconds per call, the candidates interleaved so machine load hits all alike.

    `gap` seconds of sleep before each call let the previous candidate's thread pool (torch's
    OpenMP threads, onnxruntime's spinning workers) go idle instead of competing for cores.
    """
    for fn in fns.values():
        fn()  # warm-up: allocations, kernel selection
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for key, fn in fns.items():
            time.sleep(gap)
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _torch_grads(net: nn.Module, x: torch.Tensor, category: int):
    acts = []

    def keep(module, inputs, out):
        if not out.requires_grad:
            out.requires_grad_()  # the first conv: nothing upstream needs a gradient
        out.retain_grad()
        acts.append(out)

    hooks = [m.register_forward_hook(keep) for m in net.modules() if isinstance(m, nn.Conv2d)]
    out = net(x)
    out[:, category].sum().backward()
    for h in hooks:
        h.remove()
    return [a.detach().numpy() for a in acts], [a.grad.numpy() for a in acts]


def _macs(model: onnx.ModelProto) -> tuple[int, int]:
    """Forward MACs of every layer, and backward MACs: each Conv not reading a graph input
    needs an input-gradient convolution of its own MACs."""
    rows = layers(load(model))
    inputs = {i.name for i in model.graph.input}
    reads_input = {n.name for n in model.graph.node if n.input and n.input[0] in inputs}
    forward = sum(row["flops"] for row in rows)
    backward = sum(
        row["flops"] for row in rows if row["op"] == "Conv" and row["name"] not in reads_input
    )
    return forward, backward


def bench(
    name: str,
    net: nn.Module,
    shape: tuple[int, ...],
    threads: int,
    repeat: int,
    gap: float,
    profile: bool = False,
) -> None:
    torch.manual_seed(0)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(*shape)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["out"],
            opset_version=17,
            dynamo=False,
        )
        model = onnx.load(str(path))
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    feeds = {"input": x.numpy()}
    start = time.perf_counter()
    grad_session = GradientSession(model, convs, "out", threads=threads)
    build = time.perf_counter() - start
    forward = session(model, threads=threads)
    n = shape[0]
    t = _timed(
        {
            "ours": lambda: grad_session.run(feeds, [1]),
            "ours3": lambda: grad_session.run(feeds, [1, 2, 3]),
            "fwd": lambda: forward.run(None, feeds),
            "torch": lambda: _torch_grads(net, x, 1),
        },
        repeat,
        gap,
    )
    t_ours, t_ours3, t_fwd, t_torch = t["ours"], t["ours3"], t["fwd"], t["torch"]
    fwd_macs, bwd_macs = _macs(model)
    rate = fwd_macs / t_fwd
    print(
        f"\n{name}: batch {shape}, {len(convs)} Conv outputs, {threads} threads, "
        f"session built in {build:.1f} s"
    )
    rows = [
        ("onnxcut (1 category)", t_ours),
        ("onnxcut (3 categories)", t_ours3),
        ("torch eager autograd", t_torch),
        ("onnxruntime forward only", t_fwd),
    ]
    for label, t in rows:
        print(f"  {label:26s} {n / t:8.1f} images/s  ({t * 1000:7.1f} ms/batch)")
    print(f"  onnxcut / torch eager   {t_torch / t_ours:5.2f}x  (target >= 1.5)")
    print(f"  onnxcut / forward only  {t_fwd / t_ours:5.2f}   (target >= 0.40)")
    print(
        f"  MACs per batch: forward {fwd_macs / 1e9:.2f} G, backward {bwd_macs / 1e9:.2f} G; "
        f"onnxruntime forward runs {rate / 1e9:.1f} GMAC/s"
    )
    print(
        f"  compute bound on onnxcut / torch eager: {t_torch / ((fwd_macs + bwd_macs) / rate):.2f}x"
    )
    _check_same(grad_session, feeds, net, x)
    if profile:
        _profile(grad_session, feeds, threads, repeat)


def _profile(grad_session: GradientSession, feeds, threads: int, repeat: int) -> None:
    """Kernel time per op type, forward and backward part, from onnxruntime's profiler."""
    import onnxruntime as ort

    from onnxcut.grad.session import CATEGORIES, MASK

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.gettempdir(), "onnxcut-grad-profile")
    sess = ort.InferenceSession(
        grad_session.model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    run_feeds = {**feeds, CATEGORIES: np.array([[1]], np.int64)}
    run_feeds[MASK] = np.ones((1,) * (grad_session.rank + 1), np.float32)
    sess.run(grad_session.outputs, run_feeds)  # warm-up: kernel selection, allocations
    for _ in range(repeat):
        sess.run(grad_session.outputs, run_feeds)
    path = sess.end_profiling()
    events = [e for e in json.loads(Path(path).read_text()) if e.get("cat") == "Node"]
    Path(path).unlink()
    runs = repeat + 1
    total: collections.Counter = collections.Counter()
    for e in events:
        if e["name"].endswith("_kernel_time"):
            part = "backward" if e["name"].startswith("grad/") else "forward"
            total[(part, e["args"].get("op_name", "?"))] += e["dur"]
    print(f"  kernel time per batch by op (onnxruntime profiler, {runs} runs incl. warm-up):")
    for (part, op), us in total.most_common(12):
        print(f"    {part:8s} {op:22s} {us / runs / 1000:7.1f} ms")


def _check_same(grad_session: GradientSession, feeds, net: nn.Module, x: torch.Tensor) -> None:
    """The last Conv's gradient must match torch's (BN folding changes earlier ones)."""
    result = grad_session.run(feeds, [1])
    _, grads = _torch_grads(net, x, 1)
    ours = result.gradients[grad_session.wrt[-1]][0]
    err = float(np.abs(ours - grads[-1]).max() / (np.abs(grads[-1]).max() + 1e-12))
    print(f"  last Conv gradient vs torch: max relative error {err:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", choices=["resnet18", "deeplab"])
    parser.add_argument(
        "--gap", type=float, default=0.3, help="seconds of idle before each timed call"
    )
    parser.add_argument("--profile", action="store_true", help="also print kernel time per op type")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.only in (None, "resnet18"):
        shape = (args.batch, 3, 224, 224)
        bench("resnet18", ResNet18(), shape, args.threads, args.repeat, args.gap, args.profile)
    if args.only in (None, "deeplab"):
        shape = (args.batch, 3, 64, 64)
        bench("deeplab", _deeplab(), shape, args.threads, args.repeat, args.gap, args.profile)


if __name__ == "__main__":
    sys.exit(main())
