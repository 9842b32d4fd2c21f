"""What one short finetuning pass adds to a category sub-network cut without training.

Cuts the Disassembler sub-network of a sample segmenter for a digit subset (as in
quality.py), runs its ONNX graph in torch (a small op table, weights as parameters),
trains it for one pass over part of the training split on the customised task (cross-entropy
over the kept outputs: background plus the chosen digits), writes the weights back into the
ONNX model and evaluates it with onnxcut.evaluate. L1 and random sub-networks at the same
per-group counts get the same pass. Needs torch (`pip install -e '.[samples]'`).

    .venv/bin/python benchmarks/finetune.py [--model deeplab_digits] [--size 2] [--images 1000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

from quality import (
    cached_scores,
    categories,
    digit_subsets,
    group_vectors,
    plan_at_counts,
    sample_setup,
    score_model,
    work_folder,
    zero_vectors,
)

from onnxcut import data
from onnxcut.attribution.selection import Selection, filter_l1, make_plan
from onnxcut.channels.deps import trace
from onnxcut.channels.surgery import extract
from onnxcut.graph.io import load, save


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(x, w, b=None, *, pads=(0, 0, 0, 0), strides=(1, 1), dilations=(1, 1), group=1, **_):
    assert pads[:2] == pads[2:], "asymmetric padding"
    return F.conv2d(x, w, b, tuple(strides), tuple(pads[:2]), tuple(dilations), group)


def _conv_t(x, w, b=None, *, pads=(0, 0, 0, 0), strides=(1, 1), group=1, **_):
    return F.conv_transpose2d(x, w, b, tuple(strides), tuple(pads[:2]), groups=group)


def _resize(x, roi=None, scales=None, sizes=None, *, mode=b"nearest", **kw):
    mode = {"linear": "bilinear", "nearest": "nearest"}[mode.decode()]
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=[int(s) for s in sizes[2:]], mode=mode)
    factor = [float(s) for s in scales[2:]]
    return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False)


# op -> fn(*inputs, **attributes); the ops of the sample models.
OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_t,
    "Relu": lambda x: F.relu(x),
    "Add": lambda a, b: a + b,
    "Mul": lambda a, b: a * b,
    "Concat": lambda *xs, axis: torch.cat(xs, axis),
    "Resize": _resize,
    "HardSwish": lambda x: F.hardswish(x),
    "HardSigmoid": lambda x, alpha=0.2, beta=0.5: torch.clamp(alpha * x + beta, 0, 1),
    "GlobalAveragePool": lambda x: x.mean((2, 3), keepdim=True),
    "MaxPool": lambda x, kernel_shape, strides=None, pads=(0, 0, 0, 0), **_: F.max_pool2d(
        x, kernel_shape, strides or kernel_shape, pads[:2]
    ),
    "BatchNormalization": lambda x, s, b, m, v, epsilon=1e-5, **_: F.batch_norm(
        x, m, v, s, b, False, 0.0, epsilon
    ),
}


# op -> how many inputs after the first are trained (weights, biases; not BN statistics)
WEIGHTS = {"Conv": 2, "ConvTranspose": 2, "BatchNormalization": 2}


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph with torch ops; the WEIGHTS inputs are parameters."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        self.model = model
        self.names: dict[str, str] = {}
        self.consts: dict[str, torch.Tensor] = {}
        trained = {
            name
            for node in model.graph.node
            if node.op_type in WEIGHTS
            for name in node.input[1 : 1 + WEIGHTS[node.op_type]]
        }
        for init in model.graph.initializer:
            tensor = torch.from_numpy(numpy_helper.to_array(init).copy())
            if init.name in trained:
                key = f"p{len(self.names)}"
                self.names[init.name] = key
                self.register_parameter(key, torch.nn.Parameter(tensor))
            else:
                self.consts[init.name] = tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.model.graph.input[0].name: x, "": None}
        env.update(self.consts)
        env.update({name: getattr(self, key) for name, key in self.names.items()})
        for node in self.model.graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                env[node.output[0]] = torch.from_numpy(numpy_helper.to_array(attrs["value"]))
                continue
            env[node.output[0]] = OPS[node.op_type](*(env[i] for i in node.input), **attrs)
        return env[self.model.graph.output[0].name]

    def write_back(self) -> onnx.ModelProto:
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for init in model.graph.initializer:
            if init.name in self.names:
                value = getattr(self, self.names[init.name]).detach().numpy()
                init.CopyFrom(numpy_helper.from_array(value, init.name))
        return model


def _training_batches(setup, model: onnx.ModelProto, keep: list[int], n: int, batch: int):
    """(x, y) batches of the first n training images; y indexes `keep`, others background."""
    pre = data.fit_to_model(data.preprocess_from(model), model)
    paths = data.list_images(setup.train)[:n]
    lookup = np.zeros(256, np.int64)  # label -> output index; 0 (background) by default
    lookup[255] = -100  # ignore
    for i, k in enumerate(keep):
        lookup[k] = i
    xs, ys = [], []
    for path in paths:
        image = data.read_image(path, pre)
        mask = data.read_mask(
            data.mask_path(setup.train_masks, path, setup.train), image.shape[:2], 11
        )
        xs.append(data.to_input(image, pre))
        ys.append(lookup[mask])
    x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch)]


def _check(net: OnnxModule, model: onnx.ModelProto, x: torch.Tensor) -> None:
    """The torch rendering computes what onnxruntime computes."""
    from onnxcut.runtime import session

    sess = session(model, "cpu", 1)
    want = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        got = net(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def finetune(
    sub: onnx.ModelProto, setup, images: int, lr: float, batch: int = 32
) -> onnx.ModelProto:
    """One pass of Adam over `images` training images; returns the updated ONNX model."""
    torch.manual_seed(0)
    meta = {p.key: p.value for p in sub.metadata_props}
    keep = json.loads(meta["onnxcut.categories"])[sub.graph.output[0].name]
    net = OnnxModule(sub)
    batches = _training_batches(setup, sub, keep, images, batch)
    _check(net, sub, batches[0][0])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for x, y in batches:
        loss = F.cross_entropy(net(x), y, ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.write_back()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="deeplab_digits")
    p.add_argument("--size", type=int, default=2)
    p.add_argument("--images", type=int, default=1000, help="training images in the pass")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--work", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    work = work_folder(args.work)
    setup = sample_setup(args.model)
    digits = digit_subsets([args.size])[args.size]
    classes = categories(setup, digits)
    model = load(setup.model)
    channels = trace(model)
    plan = make_plan(model, cached_scores(setup, work), Selection(classes))
    rng = np.random.default_rng(0)
    plans = {
        "disassembler": plan,
        "l1": plan_at_counts(plan, group_vectors(plan, channels, filter_l1(channels))),
        "random": plan_at_counts(
            plan, {k: rng.random(len(v)) for k, v in zero_vectors(plan, channels).items()}
        ),
    }
    ref = score_model(setup, setup.model, classes)["metric"]
    print(
        f"{args.model}, digits {digits}: original mIoU {ref:.3f}; one pass over {args.images} "
        f"training images, Adam lr {args.lr}, batch 32\n"
    )
    print("| sub-network | flops_kept | mIoU kept, no training | after one pass | pass (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan in plans.items():
            sub = extract(setup.model, plan)
            save(sub, Path(tmp) / "sub.onnx")
            before = score_model(setup, Path(tmp) / "sub.onnx", classes)
            t0 = time.perf_counter()
            tuned = finetune(sub, setup, args.images, args.lr)
            seconds = time.perf_counter() - t0
            save(tuned, Path(tmp) / "tuned.onnx")
            after = score_model(setup, Path(tmp) / "tuned.onnx", classes)
            flops = before["flops"] / score_model(setup, setup.model, classes)["flops"]
            print(
                f"| {name} | {flops:.3f} | {before['metric'] / ref:.3f} | "
                f"{after['metric'] / ref:.3f} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
