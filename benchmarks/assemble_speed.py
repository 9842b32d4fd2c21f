"""assemble: FLOPs of same-model unions, latency of one file against two, union accuracy.

    python benchmarks/assemble_speed.py [--threads 1 2] [--runs 300] [--epochs 1] [--parallel]

1. FLOPs. Two sub-networks of one sample model (plans for digits {3,5} and {5,7};
   deeplab's own indices are digit + 1) assembled as their union, against `extract` with the
   union of their categories.
2. Latency. Two different sample models (whole) assembled into one file, against the two run
   one after the other: onnxruntime CPU, batch 1, the same thread count, interleaved runs,
   medians. Target: ratio <= 0.95.
3. Union accuracy. resnet_digits_cls cut to digits 0-4 and vgg_digits_cls cut to 5-9 (plans
   from scores on a train shard), assembled; top-1 on the 10-digit val set without training
   and after --calibrate on the unlabeled digits; then after one epoch of distill against
   the two original classifiers, joined by `teacher_for` into one teacher (distill's CLI
   takes one --teacher; see `distilled` for the metadata it cannot read yet).
4. Fusion check. Two branches of six 3x3 convolutions against the same as one chain of
   grouped (block-diagonal) convolutions: would fusing same-architecture parts pay?
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnx

import onnxcut
from onnxcut import data
from onnxcut.assemble import AssembleOptions, Part, assemble, teacher_for
from onnxcut.attribution import AttributeOptions, Selection, make_plan
from onnxcut.attribution.scores import load_scores, save_scores
from onnxcut.graph.shapes import default_batch_inplace, infer_shapes
from onnxcut.runtime import session
from onnxcut.train import DistillOptions

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "samples" / "models"
CLS = ROOT / "samples" / "data" / "digits_cls"
SCENES = ROOT / "samples" / "data" / "digit_scenes"


def flops(model) -> int:
    m = onnxcut.load(model)
    if default_batch_inplace(m):
        infer_shapes(m)
    return onnxcut.summarize(m)["flops"]


def scores_for(name: str, work: Path, threads: int | None):
    """Attribute a sample model once (cached under `work`)."""
    path = work / f"{name}.npz"
    model = MODELS / f"{name}.onnx"
    if path.exists():
        return load_scores(path)
    if name.endswith("_cls"):
        opts = AttributeOptions(shard="1/20", threads=threads)
        scores = onnxcut.attribute(model, CLS / "train", opts)
    else:
        opts = AttributeOptions(masks=str(SCENES / "train" / "masks"), shard="1/5", threads=threads)
        scores = onnxcut.attribute(model, SCENES / "train" / "images", opts)
    save_scores(scores, path)
    return scores


def flops_target(name: str, a, b, work: Path, threads) -> None:
    model = MODELS / f"{name}.onnx"
    scores = scores_for(name, work, threads)
    loaded = onnxcut.load(model)
    pa = make_plan(loaded, scores, Selection(tuple(a)))
    pb = make_plan(loaded, scores, Selection(tuple(b)))
    pu = make_plan(loaded, scores, Selection(tuple(sorted({*a, *b}))))
    union = assemble([Part(model, plan=pa), Part(model, plan=pb)])
    exact = assemble([Part(model, plan=pa), Part(model, plan=pb)], AssembleOptions(share="exact"))
    sub_a, sub_b = onnxcut.extract(model, pa), onnxcut.extract(model, pb)
    ref = flops(onnxcut.extract(model, pu))
    fa, fb, fu, fe = flops(sub_a), flops(sub_b), flops(union), flops(exact)
    print(f"{name}: categories {a} + {b} (the model's own indices)")
    print(f"  original {flops(model):,} MACs; sub-networks {fa:,} + {fb:,} = {fa + fb:,}")
    print(f"  extract with the union of categories: {ref:,} MACs")
    print(f"  assemble (union):  {fu:,} MACs = {fu / ref:.3f} x extract   (target <= 1)")
    print(f"  assemble --share exact: {fe:,} MACs = {fe / ref:.3f} x extract")


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def _parallel_session(path: Path, threads: int):
    """The assembled model with its branches on `threads` inter-op threads, one intra-op
    thread each: the same thread count as the separate sessions."""
    from onnxcut.runtime import onnxruntime

    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    opts.inter_op_num_threads = threads
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def latency(names: list[str], threads: int, runs: int, work: Path, parallel: bool = False) -> float:
    paths = [MODELS / f"{n}.onnx" for n in names]
    model = assemble([str(p) for p in paths])
    out = onnxcut.save(model, work / f"{'+'.join(names)}.onnx")
    sessions = [session(p, threads=threads) for p in paths]
    joined = session(out, threads=threads)
    if parallel:
        joined = _parallel_session(out, threads)
    shape = [1, *[d for d in onnxcut.load(paths[0]).graph.input[0].type.tensor_type.shape.dim]]
    size = [1] + [d.dim_value for d in shape[2:]]
    x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    name = joined.get_inputs()[0].name
    for _ in range(20):
        for s in [*sessions, joined]:
            s.run(None, {name: x})
    separate, together = [], []
    for _ in range(runs):  # interleaved, so load on the shared machine hits both alike
        t0 = time.perf_counter()
        for s in sessions:
            s.run(None, {name: x})
        t1 = time.perf_counter()
        joined.run(None, {name: x})
        t2 = time.perf_counter()
        separate.append(t1 - t0)
        together.append(t2 - t1)
    ratio = _median_ms(together) / _median_ms(separate)
    how = ", branches in parallel" if parallel else ""
    print(
        f"  {' + '.join(names)}, {threads} thread(s){how}: one after the other "
        f"{_median_ms(separate):.3f} ms, assembled {_median_ms(together):.3f} ms, "
        f"ratio {ratio:.3f} (target <= 0.95)"
    )
    return ratio


def top1(model, images: Path) -> float:
    """Top-1 over class folders, an output channel's label being its original category."""
    meta = {p.key: p.value for p in model.metadata_props}
    if "onnxcut.categories" in meta:
        cats = next(iter(json.loads(meta["onnxcut.categories"]).values()))
        labels = np.array([c[1] if isinstance(c, list) else c for c in cats])
    else:
        labels = np.arange(10)
    pre = data.fit_to_model(data.preprocess_from(model), model)
    sess = session(model)
    name = sess.get_inputs()[0].name
    folders = data.class_folders(images)
    right = total = 0
    for batch in data.batches(data.list_images(images), pre, 64):
        pred = labels[np.argmax(sess.run(None, {name: batch.inputs})[0], axis=1)]
        truth = np.array([folders[p.parent.name] for p in batch.paths])
        right += int((pred == truth).sum())
        total += len(truth)
    return right / total


def _with_categories(model, cats) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    props = [p for p in out.metadata_props if p.key != "onnxcut.categories"]
    del out.metadata_props[:]
    out.metadata_props.extend(props)
    out.metadata_props.append(onnx.StringStringEntryProto(key="onnxcut.categories", value=cats))
    return out


def distilled(student, originals, threads, epochs: int) -> onnx.ModelProto:
    """Distill an assembled student against its parts' original models, through the one
    teacher `teacher_for` joins from them.

    distill reads `onnxcut.categories` as plain indices; until it reads [part, category]
    pairs, both models get channel positions for the run (they line up one to one) and the
    student its own metadata back.
    """
    teacher = teacher_for(student, originals)
    meta = {p.key: p.value for p in student.metadata_props}["onnxcut.categories"]
    k = len(next(iter(json.loads(meta).values())))
    positions = json.dumps({"logits": list(range(k))})
    opts = DistillOptions(epochs=epochs, threads=threads, lr=1e-3, batch=16)
    trained = onnxcut.distill(
        _with_categories(student, positions),
        _with_categories(teacher, positions),
        CLS / "unlabeled",
        opts,
    )
    return _with_categories(trained, meta)


def union_accuracy(work: Path, threads, epochs: int) -> None:
    resnet, vgg = MODELS / "resnet_digits_cls.onnx", MODELS / "vgg_digits_cls.onnx"
    low, high = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    plans = [
        make_plan(onnxcut.load(m), scores_for(m.stem, work, threads), Selection(c))
        for m, c in ((resnet, low), (vgg, high))
    ]
    calib = AssembleOptions(calibrate=str(CLS / "unlabeled"), calibrate_limit=512)
    cut = [Part(resnet, plan=plans[0]), Part(vgg, plan=plans[1])]
    heads = [Part(resnet, low), Part(vgg, high)]
    print("union top-1 on the 10-digit val set (300 images):")
    print(
        f"  the originals: resnet {top1(onnxcut.load(resnet), CLS / 'val'):.3f}, "
        f"vgg {top1(onnxcut.load(vgg), CLS / 'val'):.3f}"
    )
    for label, parts in (("cut sub-networks", cut), ("heads only (no channel cut)", heads)):
        plain = assemble(parts)
        tempered = assemble(parts, calib)
        temps = [
            u["temperature"]
            for u in json.loads(
                {p.key: p.value for p in tempered.metadata_props}["onnxcut.assembly"]
            )["units"]
        ]
        print(
            f"  {label}: {flops(plain):,} MACs; no training {top1(plain, CLS / 'val'):.3f}, "
            f"--calibrate {top1(tempered, CLS / 'val'):.3f} "
            f"(T = {', '.join(f'{t:.3f}' for t in temps)})"
        )
        if parts is cut and epochs > 0:
            for name, student in (("no calibration", plain), ("--calibrate", tempered)):
                trained = distilled(student, [resnet, vgg], threads, epochs)
                print(
                    f"    after distill ({name}, {epochs} epoch(s)): "
                    f"{top1(trained, CLS / 'val'):.3f}"
                )


def _conv_chain(channels: int, size: int, depth: int, fused: bool) -> onnx.ModelProto:
    """Two branches of `depth` 3x3 Conv+Relu layers on one input, or the same two as one
    chain of block-diagonal (group=2) convolutions."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv(x: str, cin: int, cout: int, group: int, name: str) -> str:
        w = rng.standard_normal((cout, cin // group, 3, 3)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"{name}_w"))
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}_w"], [name], kernel_shape=[3, 3], pads=[1] * 4, group=group
            )
        )
        nodes.append(helper.make_node("Relu", [name], [f"{name}_r"]))
        return f"{name}_r"

    outs = []
    for branch in ["f"] if fused else ["a", "b"]:
        width, group = (2 * channels, 2) if fused else (channels, 1)
        y = conv("input", 3, width, 1, f"{branch}0")
        for i in range(1, depth):
            y = conv(y, width, width, group, f"{branch}{i}")
        outs.append(y)
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fusion_check(threads: int, runs: int) -> None:
    """Would fusing same-architecture parts into grouped convolutions pay on this runtime?"""
    for channels, size in ((16, 32), (32, 32), (64, 16), (32, 64)):
        branches, fused = (
            session(_conv_chain(channels, size, 6, f), threads=threads) for f in (False, True)
        )
        x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
        times: list[list[float]] = [[], []]
        for i in range(runs + 10):
            for k, s in enumerate((branches, fused)):
                t0 = time.perf_counter()
                s.run(None, {"input": x})
                if i >= 10:
                    times[k].append(time.perf_counter() - t0)
        a, b = _median_ms(times[0]), _median_ms(times[1])
        print(
            f"  6 conv layers, {channels} channels, {size}x{size}, {threads} thread(s): two "
            f"branches {a:.3f} ms, grouped {b:.3f} ms, ratio {b / a:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--work", default="/tmp/onnxcut_assemble")
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="also time the assembled model with its branches on inter-op threads",
    )
    ap.add_argument("--epochs", type=int, default=1, help="distill epochs (0: no distill)")
    ap.add_argument(
        "--skip", nargs="*", default=[], choices=["flops", "latency", "accuracy", "fusion"]
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    threads = max(args.threads)
    if "flops" not in args.skip:
        print("1. FLOPs of two sub-networks of one model")
        flops_target("resnet_digits_cls", (3, 5), (5, 7), work, threads)
        # Segmenters: background at 0, digit d at d + 1.
        flops_target("deeplab_digits", (0, 4, 6), (0, 6, 8), work, threads)
    if "latency" not in args.skip:
        print("2. latency of two models in one file (onnxruntime CPU, batch 1)")
        for t in args.threads:
            for parallel in (False, True) if t > 1 and args.parallel else (False,):
                latency(["resnet_digits_cls", "vgg_digits_cls"], t, args.runs, work, parallel)
                latency(["deeplab_digits", "unet_digits"], t, args.runs // 3, work, parallel)
    if "accuracy" not in args.skip:
        print("3. union accuracy")
        union_accuracy(work, threads, args.epochs)
    if "fusion" not in args.skip:
        print("4. grouped-convolution fusion of two same-architecture branches (not built)")
        for t in args.threads:
            fusion_check(t, args.runs // 2)


if __name__ == "__main__":
    main()
