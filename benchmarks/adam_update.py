"""Adam's update alone: the trainer's 11-op spelling against the textbook 13-op one.

    python benchmarks/adam_update.py [--threads 2] [--repeat 12]

Builds two ONNX graphs that apply one Adam step to ResNet-18-sized weights (4 of 512x512x3x3,
6 of 256x256x3x3, 4 of 128x128x3x3, 4 of 64x64x3x3 and a 1000x512 Gemm: 14.2 M weights):
  onnxcut    optimizers.OPTIMIZERS["adam"], the rule the trainer emits (scaled second moment,
             the step's constants in two fed scalars)
  reference  m' = b1 m + (1 - b1) g; v' = b2 v + (1 - b2) g^2;
             p' = p - lr_t m' / (sqrt(v') c_t + eps), one op per term (the previous spelling)
runs both on the same random weights, interleaved, and prints the median time of each and
their ratio. Each op is a pass over every weight, so the update is memory-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper

from onnxcut.runtime import session
from onnxcut.train.builder import Builder
from onnxcut.train.optimizers import EPSILON, LR, OPTIMIZERS, Optimizer

SHAPES = [(512, 512, 3, 3)] * 4 + [(256, 256, 3, 3)] * 6 + [(128, 128, 3, 3)] * 4
SHAPES += [(64, 64, 3, 3)] * 4 + [(1000, 512)]


def _reference(b: Builder, p: str, g: str, m: str, v: str, out: tuple[str, str, str]) -> None:
    b1, b2 = Optimizer().betas
    new_p, new_m, new_v = out
    m2 = b.op("Add", [b.op("Mul", [m, b.scalar(b1)]), b.op("Mul", [g, b.scalar(1 - b1)])], new_m)
    gg = b.op("Mul", [b.op("Mul", [g, g]), b.scalar(1 - b2)])
    v2 = b.op("Add", [b.op("Mul", [v, b.scalar(b2)]), gg], new_v)
    # EPSILON stands in for the bias correction c_t here: one fed scalar either way.
    denom = b.op("Add", [b.op("Mul", [b.op("Sqrt", [v2]), EPSILON]), b.scalar(1e-8)])
    b.op("Sub", [p, b.op("Mul", [b.op("Div", [m2, denom]), LR])], new_p)


def _onnxcut(b: Builder, p: str, g: str, m: str, v: str, out: tuple[str, str, str]) -> None:
    new_p, new_m, new_v = out
    OPTIMIZERS["adam"].emit(b, Optimizer(), p, g, {"m": m, "w": v}, new_p, {"m": new_m, "w": new_v})


def _model(rule):
    b, inputs, outputs = Builder("adam"), [], []
    for i, shape in enumerate(SHAPES):
        names = [f"{x}{i}" for x in "pgmv"]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in names]
        out = (f"new_p{i}", f"new_m{i}", f"new_v{i}")
        rule(b, *names, out)
        outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in out]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in (LR, EPSILON)]
    graph = helper.make_graph(b.nodes, "adam", inputs, outputs, b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=12)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    feeds = {
        f"{x}{i}": rng.random(shape, dtype=np.float32)
        for i, shape in enumerate(SHAPES)
        for x in "pgmv"
    }
    feeds[LR], feeds[EPSILON] = np.array(1e-4, np.float32), np.array(1e-8, np.float32)
    sessions = {k: session(_model(r), "cpu", args.threads) for k, r in
                (("onnxcut", _onnxcut), ("reference", _reference))}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.repeat + 2):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v[2:]) * 1000 for k, v in times.items()}
    weights = sum(int(np.prod(s)) for s in SHAPES) / 1e6
    print(f"Adam update over {weights:.1f} M weights, {args.threads} threads, medians:")
    for name, ms in median.items():
        print(f"  {name:10s} {ms:7.1f} ms")
    print(f"  onnxcut / reference  {median['onnxcut'] / median['reference']:.2f}")


if __name__ == "__main__":
    main()
