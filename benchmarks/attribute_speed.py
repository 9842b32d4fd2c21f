"""Images/s of onnxcut.attribute (Disassembler scores) against a PyTorch reference.

    python benchmarks/attribute_speed.py --threads 2 --images 32 [--batch 8] [--models a,b]

For each sample segmenter (deeplab_digits, 64x64; deeplab_wide_digits, ResNet-18 widths, trained
first when missing) the first --images validation scenes are copied to a temporary folder, then
both sides score them end to end (model loading included) at the same thread count:
  onnxcut   onnxcut.attribute(model, folder, AttributeOptions(threads, batch, tau=0.9))
  torch     the ONNX graph run eagerly in torch (a small interpreter, one rule per op, for the
            ops these models use), --batch images per forward; dS_k/dF of every probed feature
            map by autograd, all categories present in the batch in one
            torch.autograd.grad(..., is_grads_batched=True) call (--torch-grad loop: one
            backward per category); masks, masked sums (float32, as onnxcut), normalising
            and quantising (float64) in torch
It prints both images/s and onnxcut/torch (target >= 1.5), and checks that the torch graph gives
onnxruntime's logits and that every score array and the counts agree within --tolerance (1e-4;
exit 1 otherwise). One untimed warm-up per side runs on the first --batch images. Beside the
check it counts ReLU inputs whose sign differs between torch and onnxruntime's forward pass
("gates"): a pre-activation within float32 rounding of zero opens the gate on one side only,
which moves that image's gradients below it by percents, not rounding, and so its backward and
Taylor vectors there. onnxcut's own sessions round differently again, so the count shows such
flips, not all of them.

What both compute, per image and present category k (masks M_k = softmax_k > tau, resized
nearest to each probed feature map F (C, h, w); S_k = sum of logit k over M_k):
    forward  sum_M |F|,  backward sum_M relu(dS_k/dF),  taylor |sum_M F dS_k/dF|
each normalised over channels, quantised to 2**-32 and summed per category (onnxcut/attribution).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxcut import AttributeOptions, attribute, data
from onnxcut.attribution.probe import Head, channel_counts, find_head, probe_layers
from onnxcut.attribution.scores import QUANTUM
from onnxcut.graph.io import expose_tensors, load
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes
from onnxcut.runtime import session

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT / "samples" / "data" / "digit_scenes" / "val" / "images"
KINDS = ("forward", "backward", "taylor")

# ONNX op -> torch: rule(attrs, *inputs) returns the node's output (one tensor).
_OPS: dict[str, Callable[..., torch.Tensor]] = {}


def _op(name: str):
    def register(rule):
        assert name not in _OPS, f"two rules for {name}"
        _OPS[name] = rule
        return rule

    return register


@_op("Constant")
def _constant(attrs) -> torch.Tensor:
    return torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())


@_op("Conv")
def _conv(attrs, x, w, b=None) -> torch.Tensor:
    assert attrs.get("auto_pad", "NOTSET") == "NOTSET", "auto_pad: not in these models"
    assert w.dim() == 4, "2-D convolutions only"
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    if (top, left) != (bottom, right):  # torch pads both sides alike: pad explicitly first
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    return F.conv2d(
        x,
        w,
        b,
        attrs.get("strides", 1),
        (top, left),
        attrs.get("dilations", 1),
        attrs.get("group", 1),
    )


@_op("Relu")
def _relu(attrs, x) -> torch.Tensor:
    return torch.relu(x)


@_op("Add")
def _add(attrs, a, b) -> torch.Tensor:
    return a + b


@_op("Concat")
def _concat(attrs, *xs) -> torch.Tensor:
    return torch.cat(xs, attrs["axis"])


# (mode, coordinate_transformation_mode, nearest_mode) -> F.interpolate arguments giving the
# same sampling positions.
_RESIZE = {
    ("linear", "half_pixel", None): {"mode": "bilinear", "align_corners": False},
    ("linear", "pytorch_half_pixel", None): {"mode": "bilinear", "align_corners": False},
    ("linear", "align_corners", None): {"mode": "bilinear", "align_corners": True},
    ("nearest", "asymmetric", "floor"): {"mode": "nearest"},
    ("nearest", "half_pixel", "round_prefer_ceil"): {"mode": "nearest-exact"},
}


@_op("Resize")
def _resize(attrs, x, roi=None, scales=None, sizes=None) -> torch.Tensor:
    mode = attrs.get("mode", "nearest")
    key = (
        mode,
        attrs.get("coordinate_transformation_mode", "half_pixel"),
        attrs.get("nearest_mode", "round_prefer_floor") if mode == "nearest" else None,
    )
    if key not in _RESIZE or x.dim() != 4 or attrs.get("antialias", 0):
        raise NotImplementedError(f"Resize {key} on rank {x.dim()}: no torch equivalent here")
    if sizes is not None and sizes.numel():
        return F.interpolate(x, size=sizes.tolist()[2:], **_RESIZE[key])
    assert scales.tolist()[:2] == [1.0, 1.0], "Resize scales batch or channels"
    return F.interpolate(x, scale_factor=scales.tolist()[2:], **_RESIZE[key])


def _attrs(node: onnx.NodeProto) -> dict:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


class TorchGraph:
    """An ONNX graph evaluated eagerly in torch, node by node, with the rules in _OPS."""

    def __init__(self, model: onnx.ModelProto):
        missing = sorted({n.op_type for n in model.graph.node} - _OPS.keys())
        if missing:
            raise NotImplementedError(
                f"the torch reference has no rule for {', '.join(missing)}; "
                f"supported: {', '.join(sorted(_OPS))}"
            )
        self.nodes = [(n, _attrs(n)) for n in model.graph.node]
        self.consts = {
            t.name: torch.from_numpy(numpy_helper.to_array(t).copy())
            for t in model.graph.initializer
        }
        self.input = next(i.name for i in model.graph.input if i.name not in self.consts)

    def run(self, x: torch.Tensor, watch: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Every tensor of the graph; those in `watch` join autograd (dS/d them is wanted)."""
        values = {**self.consts, self.input: x}
        for node, attrs in self.nodes:
            out = _OPS[node.op_type](attrs, *(values[n] if n else None for n in node.input))
            if node.output[0] in watch and not out.requires_grad:
                out.requires_grad_()  # upstream of it is only the image and constants
            values[node.output[0]] = out
        return values


@dataclass
class Reference:
    graph: TorchGraph
    head: Head
    layers: dict[str, str]  # probed node -> feature tensor, as onnxcut picks them
    channels: dict[str, int]
    pre: data.Preprocess


def load_reference(path: Path) -> Reference:
    """Build the torch graph; pick head, layers and preprocessing as attribute() does."""
    proto = load(path)
    if default_batch_inplace(proto):
        infer_shapes(proto)
    head = find_head(proto)
    if not head.spatial or head.axis != 1 or head.probs != "softmax" or head.score != head.output:
        raise NotImplementedError(f"{path}: the reference handles (N, K, H, W) logits only")
    layers = probe_layers(proto, None, head)
    pre = data.fit_to_model(data.preprocess_from(proto), proto)
    return Reference(TorchGraph(onnx.load(path)), head, layers, channel_counts(proto, layers), pre)


def _grads_batched(logits, feats, cats, masks):
    """dS_k/dF for every k in cats, one vmapped backward: [(P, B, C, h, w)] per feature."""
    seeds = torch.zeros((len(cats), *logits.shape))  # (P, B, K, H, W)
    for p, k in enumerate(cats.tolist()):
        seeds[p, :, k] = masks[:, p]
    return torch.autograd.grad(logits, feats, seeds, is_grads_batched=True)


def _grads_loop(logits, feats, cats, masks):
    """dS_k/dF for every k in cats, one backward per category: [(P, B, C, h, w)]."""
    per_k = [
        torch.autograd.grad((logits[:, k] * masks[:, p]).sum(), feats, retain_graph=True)
        for p, k in enumerate(cats.tolist())
    ]
    return [torch.stack(g) for g in zip(*per_k, strict=True)]


GRADS = {"batched": _grads_batched, "loop": _grads_loop}


def _resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """onnxcut's nearest resize (probe.resize_masks): pixel centres, floored."""
    h, w = masks.shape[-2:]
    if (h, w) == tuple(size):
        return masks
    rows = ((torch.arange(size[0], dtype=torch.float64) + 0.5) * h / size[0]).long()
    cols = ((torch.arange(size[1], dtype=torch.float64) + 0.5) * w / size[1]).long()
    return masks[..., rows.clamp_max(h - 1)[:, None], cols.clamp_max(w - 1)[None, :]]


def _normalise_quantize(v: torch.Tensor) -> torch.Tensor:
    total = v.sum(-1, keepdim=True)
    v = torch.where(total > 0, v / total, torch.zeros_like(v))
    return torch.round(v / QUANTUM) * QUANTUM


def _accumulate(ref: Reference, x: torch.Tensor, tau: float, sums, count, grads: str) -> None:
    """Add one batch's per-image score vectors to the (K, C) sums."""
    feats = list(ref.layers.values())
    values = ref.graph.run(x, frozenset(feats))
    logits = values[ref.head.score]  # (B, K, H, W)
    masks = torch.softmax(logits.detach(), 1) > tau  # (B, K, H, W)
    present = masks.flatten(2).any(2)  # (B, K)
    cats = present.any(0).nonzero()[:, 0]  # (P,) present in some image of the batch
    if not len(cats):
        return
    # Images where k is absent have an all-zero mask, so they add nothing to S_k.
    masks, present = masks[:, cats], present[:, cats].double()  # (B, P, H, W), (B, P)
    gradients = GRADS[grads](logits, [values[t] for t in feats], cats, masks.float())
    for (name, tensor), g in zip(ref.layers.items(), gradients, strict=True):
        # Masked sums as float32 batched matrix products, like onnxcut's; then float64.
        f = values[tensor].detach().flatten(2)  # (B, C, hw)
        g = g.flatten(3)  # (P, B, C, hw)
        m = _resize_masks(masks, values[tensor].shape[-2:]).flatten(2).float()  # (B, P, hw)
        vectors = {  # (B, P, C)
            "forward": torch.einsum("bcx,bpx->bpc", f.abs(), m),
            "backward": torch.einsum("pbcx,bpx->bpc", g.clamp_min(0), m),
            "taylor": torch.einsum("pbcx,bpx->bpc", g * f, m).abs(),
        }
        for kind, v in vectors.items():
            added = (_normalise_quantize(v.double()) * present[..., None]).sum(0)  # (P, C)
            sums[f"{kind}/{name}"].index_add_(0, cats, added)
    count.index_add_(0, cats, present.sum(0))


def _read_batch(paths: list[Path], pre: data.Preprocess) -> torch.Tensor | None:
    images = [data.read_image(p, pre) for p in paths]
    xs = [data.to_input(im, pre) for im in images if im is not None]
    return torch.from_numpy(np.stack(xs)) if xs else None


def reference_scores(
    model: Path, folder: Path, tau: float, batch: int, grads: str = "batched"
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The torch reference of attribute(): ({"forward/<layer>": (K, C)}, count (K,))."""
    ref = load_reference(model)
    k = ref.head.n_categories
    sums = {
        f"{kind}/{name}": torch.zeros(k, c, dtype=torch.float64)
        for kind in KINDS
        for name, c in ref.channels.items()
    }
    count = torch.zeros(k, dtype=torch.float64)
    paths = data.list_images(folder)
    for start in range(0, len(paths), batch):
        x = _read_batch(paths[start : start + batch], ref.pre)
        if x is not None:
            _accumulate(ref, x, tau, sums, count, grads)
    return {key: v.numpy() for key, v in sums.items()}, count.numpy()


def forward_check(model: Path, folder: Path, threads: int, batch: int) -> tuple[float, int]:
    """Max |logits| difference between the torch graph and onnxruntime over the images, and
    how many ReLU inputs differ in sign (pre-activations within float32 rounding of zero): a
    gate open on one side only changes dS/dF below it by far more than rounding."""
    ref = load_reference(model)
    gates = [node.input[0] for node, _ in ref.graph.nodes if node.op_type == "Relu"]
    names = [ref.head.score, *gates]
    ort = session(expose_tensors(onnx.load(model), gates), threads=threads)
    paths = data.list_images(folder)
    error, flips = 0.0, 0
    for start in range(0, len(paths), batch):
        x = _read_batch(paths[start : start + batch], ref.pre)
        with torch.no_grad():
            ours = ref.graph.run(x)
        theirs = dict(zip(names, ort.run(names, {ref.graph.input: x.numpy()}), strict=True))
        error = max(error, float(np.abs(ours[ref.head.score].numpy() - theirs[names[0]]).max()))
        flips += sum(int(((ours[t].numpy() > 0) != (theirs[t] > 0)).sum()) for t in gates)
    return error, flips


def _image_folder(root: Path, n: int) -> Path:
    """Copy the first n validation scenes into root, so both sides read the same files."""
    if not VAL.is_dir():
        subprocess.run(
            [sys.executable, str(ROOT / "samples" / "make_data.py"), "--splits", "val"], check=True
        )
    paths = data.list_images(VAL)
    if len(paths) < n:
        raise SystemExit(f"--images {n}: {VAL} holds only {len(paths)} images")
    root.mkdir()
    for p in paths[:n]:
        shutil.copy(p, root / p.name)
    return root


def _model(name: str) -> Path:
    path = ROOT / "samples" / "models" / f"{name}.onnx"
    if not path.exists():
        print(f"{path} missing: training it (samples/train.py --models {name})", flush=True)
        sys.path.insert(0, str(ROOT / "samples"))
        import train  # torch, only to build the model

        train.ensure_model(name)
    return path


def _timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` calls and the last result; a pause first lets the other
    side's thread pool go idle."""
    times = []
    for _ in range(repeat):
        time.sleep(1.0)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def bench(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    model = _model(name)
    folder = _image_folder(tmp / name, args.images)
    warm = _image_folder(tmp / f"{name}-warm", min(args.batch, args.images))
    opts = AttributeOptions(threads=args.threads, batch=args.batch, tau=args.tau)

    def ours(where: Path):
        return attribute(model, where, opts)

    def theirs(where: Path):
        return reference_scores(model, where, args.tau, args.batch, args.torch_grad)

    logits, flips = forward_check(model, folder, args.threads, args.batch)
    ours(warm)
    theirs(warm)
    t_ours, scores = _timed(lambda: ours(folder), args.repeat)
    t_torch, (arrays, count) = _timed(lambda: theirs(folder), args.repeat)
    assert set(arrays) == set(scores.arrays), "the two sides probe different layers"
    diffs = {key: float(np.abs(scores.arrays[key] - arrays[key]).max()) for key in arrays}
    print(
        f"\n{name}: {len(scores.layers())} probed layers; torch vs onnxruntime: logits "
        f"{logits:.1e}, ReLU inputs of opposite sign {flips}"
    )
    print(f"  {'max |diff| per layer':48s} {'forward':>9s} {'backward':>9s} {'taylor':>9s}")
    for layer in scores.layers():
        row = " ".join(f"{diffs[f'{kind}/{layer}']:9.1e}" for kind in KINDS)
        print(f"  {layer[:48]:48s} {row}")
    return {
        "model": name,
        "ours": args.images / t_ours,
        "torch": args.images / t_torch,
        "diff": max(diffs.values()),
        "logits": logits,
        "flips": flips,
        "counts": bool(np.array_equal(scores.count, count)),
        "count": int(count.sum()),
    }


def _print_table(rows: list[dict], tolerance: float) -> bool:
    """Print the summary; return whether every model's scores agree."""
    print(
        f"\n{'model':20s} {'onnxcut img/s':>13s} {'torch img/s':>11s} {'onnxcut/torch':>13s} "
        f"{'max|diff|':>9s} {'logits':>8s} {'gates':>5s} {'counts':>13s}"
    )
    ok = True
    for r in rows:
        good = r["diff"] <= tolerance and r["logits"] <= tolerance and r["counts"]
        ok &= good
        counts = f"{'equal' if r['counts'] else 'DIFFER'} ({r['count']})"
        ratio = r["ours"] / r["torch"]
        print(
            f"{r['model']:20s} {r['ours']:13.1f} {r['torch']:11.1f} {ratio:12.2f}x "
            f"{r['diff']:9.1e} {r['logits']:8.1e} {r['flips']:5d} {counts:>13s}"
            + ("" if good else "  MISMATCH")
        )
    print(f"target: onnxcut/torch >= 1.5; scores and logits within {tolerance:g}, counts equal")
    print("gates: ReLU inputs of opposite sign in torch and onnxruntime (float32 rounding at 0)")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per call on both sides")
    parser.add_argument("--tau", type=float, default=0.9)
    parser.add_argument("--models", default="deeplab_digits,deeplab_wide_digits")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per side (median)")
    parser.add_argument("--torch-grad", choices=sorted(GRADS), default="batched")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |diff| of scores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print("command:", shlex.join([Path(sys.executable).name, *sys.argv]))
    print(
        f"threads {args.threads} (onnxruntime intra-op and torch), batch {args.batch}, "
        f"{args.images} images, tau {args.tau}, torch {torch.__version__} "
        f"({args.torch_grad} backward)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(name, args, Path(tmp)) for name in args.models.split(",") if name]
    if not _print_table(rows, args.tolerance):
        sys.exit(1)


if __name__ == "__main__":
    main()
