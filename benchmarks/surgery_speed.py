"""Benchmark surgery on a ResNet-50 (about 100 MB of float32 weights, random, exported by torch).

Prints (1) extract() wall time: load, trace, slice, shape inference and checker (target < 3 s);
(2) for 25/50/75% of the channels of every prunable group kept: params, FLOPs (MACs) and
onnxruntime CPU latency of the extracted model as ratios to the full model measured in the same
run, and latency ratio / FLOPs ratio (target <= 1.15).

    .venv/bin/python benchmarks/surgery_speed.py [--size 224] [--runs 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from onnxcut.channels.deps import trace
from onnxcut.channels.inspection import summarize
from onnxcut.channels.surgery import extract
from onnxcut.graph.io import load, save
from onnxcut.runtime import session


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 layout (3-4-6-3 bottlenecks) in plain torch."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
            cin = width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def export(path: Path, size: int) -> None:
    torch.manual_seed(0)
    model = resnet50().eval()
    for m in model.modules():  # non-trivial BN statistics, so folding has something to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
        )


def plan_for(model, ratio: float, seed: int = 0) -> dict:
    """Keep `ratio` of the channels of every prunable group, chosen at random."""
    rng = np.random.default_rng(seed)
    keep = {}
    for group in trace(model).groups:
        if group.prunable:
            n = max(1, round(ratio * group.channels))
            chosen = np.sort(rng.choice(group.channels, n, replace=False)).tolist()
            keep[group.producers[0]] = chosen
    return {"keep": keep}


def latency(model, feed: dict, runs: int, threads: int) -> float:
    sess = session(model, threads=threads)
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--runs", type=int, default=15, help="timed runs per model (median)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onnxcut-bench-") as tmp:
        path = Path(tmp) / "resnet50.onnx"
        export(path, args.size)
        mb = path.stat().st_size / 2**20
        full = load(path)
        half = plan_for(full, 0.5)
        walls = []
        for _ in range(3):
            start = time.perf_counter()
            extract(path, half)
            walls.append(time.perf_counter() - start)
        print(f"model: ResNet-50, {mb:.1f} MB, {len(full.graph.node)} nodes, input {args.size}px")
        print(
            f"extract (50% kept, {len(half['keep'])} groups cut): "
            f"median {statistics.median(walls):.2f} s, min {min(walls):.2f} s (target < 3 s)"
        )
        base = summarize(full)
        feed = {"input": np.random.default_rng(0).standard_normal((1, 3, args.size, args.size))}
        feed["input"] = feed["input"].astype(np.float32)
        t_full = latency(full, feed, args.runs, args.threads)
        print(
            f"full model: {base['params']:,} params, {base['flops']:,} MACs, {t_full * 1e3:.1f} ms"
            f" (onnxruntime CPU, {args.threads} threads, median of {args.runs})"
        )
        print(f"{'kept':>5} {'params':>8} {'FLOPs':>8} {'latency':>8} {'lat/FLOPs':>10}")
        for ratio in (0.75, 0.5, 0.25):
            cut = extract(full, plan_for(full, ratio))
            save(cut, Path(tmp) / f"cut{ratio}.onnx")
            info = summarize(cut)
            t_cut = latency(cut, feed, args.runs, args.threads)
            p, f, lat = (
                info["params"] / base["params"],
                info["flops"] / base["flops"],
                t_cut / t_full,
            )
            print(f"{ratio:>5.0%} {p:>8.3f} {f:>8.3f} {lat:>8.3f} {lat / f:>10.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
