"""ONNX-native training: trainable weights, the training graph's gradients and optimizer
steps, and distill (determinism, resume, errors) on sample models and built nets."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from onnxcut.channels.surgery import extract, read_kept
from onnxcut.cli.main import cli
from onnxcut.errors import DataError, ModelError, TrainError, UnsupportedOpError
from onnxcut.graph.io import GraphIndex, load, save
from onnxcut.graph.shapes import infer_shapes
from onnxcut.runtime import session
from onnxcut.train import DistillOptions, Optimizer, build, distill, trainable
from onnxcut.train.distill import DISTILL_KEY
from onnxcut.train.graph import LOSS, WEIGHTS, updated
from onnxcut.train.losses import SCALE, TARGET, hint_scale, hint_target
from onnxcut.train.optimizers import EPSILON, LR

from conftest import ROOT, conv_bn_net, copy_images, sample_model
from netbuilder import NetBuilder

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"
SEG = "deeplab_digits"


def seg_net(opset: int = 17) -> onnx.ModelProto:
    """conv-bn-prelu, a spelled hard-swish, a stride-2 conv, a folded-BN Mul/Add, upsample,
    3-category head: the weight kinds of PyTorch and Paddle exports."""
    b = NetBuilder((1, 3, 8, 8), seed=4, opset=opset)
    x = b.prelu(b.bn(b.conv(b.input, 4)))
    x = b.hardswish_spelled(b.conv(x, 6, stride=2))
    x = b.channel_const("Add", b.channel_const("Mul", x))
    x = b.resize(x)
    return b.build([b.conv(x, 3, k=1)])


def test_trainable_picks_weights_not_statistics_or_scalars():
    model = load(seg_net())
    names = trainable(model)
    ops = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in names:
                ops.setdefault(node.op_type, set()).add(i)
    assert ops == {
        "Conv": {1, 2},
        "BatchNormalization": {1, 2},
        "PRelu": {1},
        "Mul": {1},
        "Add": {1},
    }
    frozen = trainable(model, freeze_ops=("BatchNormalization",), freeze=("conv_1*",))
    assert not set(frozen) & {
        n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (1, 2)
    }
    assert len(frozen) == len(names) - 4  # BN scale and bias, conv_1's weight and bias


def _softmax(z: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _hint_tensors(model: onnx.ModelProto) -> list[str]:
    """Two inner tensors of seg_net: after the PRelu, and the spelled hard-swish's output."""
    ops = [n for n in model.graph.node if n.op_type in ("PRelu", "Div")]
    return [ops[0].output[0], ops[-1].output[0]]


@pytest.mark.parametrize("hints", [False, True])
def test_training_graph_gradients_match_finite_differences(hints: bool):
    """One SGD step with lr 1 and no momentum gives p - dL/dp; check dL/dp by central
    differences of the graph's own loss, for every parameter kind, with feature hints at two
    inner tensors too (their seeds join the output's on the way back)."""
    model = load(seg_net())
    params = trainable(model)
    opt = Optimizer("sgd", lr=1.0, momentum=0.0)
    out = model.graph.output[0].name
    tensors = _hint_tensors(model) if hints else []
    graph = build(model, out, 1, params, temperature=2.0, optimizer=opt, batch=2, hints=tensors)
    sess = session(graph.model, optimize=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = _softmax(rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 2)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    shapes = GraphIndex(infer_shapes(graph.model))
    feeds = {
        graph.data: x,
        TARGET: target,
        SCALE: np.array(2.0 / (2 * 8 * 8), np.float32),
        WEIGHTS: np.array([1.0, 0.5], np.float32),
        LR: np.array(1.0, np.float32),
        **{p: values[p] for p in params},
        **{s: np.zeros_like(values[s.split("/", 2)[2]]) for s in graph.states},
    }
    for t in tensors:
        shape = shapes.shape(hint_target(t))
        feeds[hint_target(t)] = rng.standard_normal(shape).astype(np.float32)
        feeds[hint_scale(t)] = np.array(0.05, np.float32)

    def loss(p: str, v: np.ndarray) -> float:
        return float(sess.run([LOSS], {**feeds, p: v})[0])

    outs = sess.run([updated(p) for p in params], feeds)
    for p, new in zip(params, outs, strict=True):
        grad = values[p] - new
        for i in list(np.ndindex(values[p].shape))[:: max(1, values[p].size // 6)]:
            up, down = values[p].copy(), values[p].copy()
            up[i] += 2e-3
            down[i] -= 2e-3
            want = (loss(p, up) - loss(p, down)) / 4e-3
            assert abs(grad[i] - want) <= 2e-3 + 2e-2 * abs(want), (p, i, grad[i], want)


def test_adam_step_is_pytorch_adam():
    """After one step Adam moves each weight by lr * g / (|g| + eps) against its gradient."""
    model = load(conv_bn_net())
    params = trainable(model)
    out = model.graph.output[0].name
    sgd = build(model, out, 1, params, optimizer=Optimizer("sgd", lr=1.0, momentum=0.0), batch=2)
    adam = build(model, out, 1, params, optimizer=Optimizer("adam", lr=1e-3), batch=2)
    rng = np.random.default_rng(1)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    base = {
        sgd.data: rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        TARGET: _softmax(rng.standard_normal((2, 10)).astype(np.float32)),
        SCALE: np.array(0.5, np.float32),
        WEIGHTS: np.ones(2, np.float32),
        **{p: values[p] for p in params},
    }

    def zeros(graph) -> dict[str, np.ndarray]:
        return {s: np.zeros_like(values[s.split("/", 2)[2]]) for s in graph.states}

    grads = session(sgd.model).run(
        [updated(p) for p in params], {**base, **zeros(sgd), LR: np.array(1.0, np.float32)}
    )
    scalars = Optimizer("adam", lr=1e-3).scalars(1)
    stepped = session(adam.model).run(
        [updated(p) for p in params],
        {**base, **zeros(adam), **{k: np.array(v, np.float32) for k, v in scalars.items()}},
    )
    assert set(scalars) == {LR, EPSILON}
    for p, g_new, a_new in zip(params, grads, stepped, strict=True):
        g = values[p] - g_new
        want = values[p] - 1e-3 * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(a_new, want, rtol=1e-4, atol=1e-6, err_msg=p)


def test_adam_over_steps_is_pytorch_adam_in_numpy():
    """Three steps of the graph's Adam (its scaled second moment, folded constants) against
    PyTorch's formula in float64, each step's gradient read from an lr-1 SGD graph at the
    current weights."""
    model = load(conv_bn_net())
    params = trainable(model)
    out = model.graph.output[0].name
    sgd = build(model, out, 1, params, optimizer=Optimizer("sgd", lr=1.0, momentum=0.0), batch=2)
    opt = Optimizer("adam", lr=1e-2, warmup=2)
    adam = build(model, out, 1, params, optimizer=opt, batch=2)
    rng = np.random.default_rng(7)
    base = {
        sgd.data: rng.standard_normal((2, 3, 16, 16)).astype(np.float32),
        TARGET: _softmax(rng.standard_normal((2, 10)).astype(np.float32)),
        SCALE: np.array(0.5, np.float32),
        WEIGHTS: np.ones(2, np.float32),
    }
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    live = {p: values[p] for p in params}
    live |= {s: np.zeros_like(values[s.split("/", 2)[2]]) for s in adam.states}
    ref = {p: values[p].astype(np.float64) for p in params}
    m = {p: np.zeros_like(ref[p]) for p in params}
    v = {p: np.zeros_like(ref[p]) for p in params}
    grad_run, adam_run = session(sgd.model), session(adam.model)
    b1, b2 = opt.betas
    for t in (1, 2, 3):
        zero = {s: np.zeros_like(values[s.split("/", 2)[2]]) for s in sgd.states}
        fed = {p: ref[p].astype(np.float32) for p in params}
        new = grad_run.run(
            [updated(p) for p in params], {**base, **fed, **zero, LR: np.array(1.0, np.float32)}
        )
        scalars = {k: np.array(x, np.float32) for k, x in opt.scalars(t).items()}
        names = [updated(n) for n in adam.carried]
        live = dict(zip(adam.carried, adam_run.run(names, {**base, **live, **scalars}), strict=1))
        lr = 1e-2 * min(1.0, t / 2)
        for p, g in zip(params, new, strict=True):
            g = ref[p] - g.astype(np.float64)
            m[p] = b1 * m[p] + (1 - b1) * g
            v[p] = b2 * v[p] + (1 - b2) * g * g
            step = lr / (1 - b1**t) * m[p] / (np.sqrt(v[p] / (1 - b2**t)) + opt.eps)
            ref[p] = ref[p] - step
            np.testing.assert_allclose(live[p], ref[p], rtol=2e-5, atol=2e-6, err_msg=(p, t))


def test_warmup_ramps_the_learning_rate():
    """lr t / W at step t up to W, then lr; Adam's bias corrections as without warmup."""
    plain, warm = Optimizer("adam", lr=1e-3), Optimizer("adam", lr=1e-3, warmup=4)
    for step in (1, 2, 4, 5, 9):
        a, b = plain.scalars(step), warm.scalars(step)
        assert b[LR] == pytest.approx(a[LR] * min(1.0, step / 4))
        assert b[EPSILON] == a[EPSILON]
    assert Optimizer("sgd", lr=0.1, warmup=10).scalars(5)[LR] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    copy_images(sorted((SCENES / "images").glob("*.png"))[:24], folder)
    return folder


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """deeplab_digits cut to background, 3 and 5 (labels 4 and 6), half its first layer."""
    model = load(sample_model(SEG))
    out = model.graph.output[0].name
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    plan = {
        "format": "onnxcut.plan/1",
        "keep": {
            first.name: list(range(0, numpy_helper.to_array(_init(model, first)).shape[0], 2))
        },
        "outputs": {out: {"axis": 1, "keep": [0, 4, 6]}},
    }
    path = tmp_path_factory.mktemp("student") / "student.onnx"
    save(extract(model, plan), path)
    return path


def _init(model: onnx.ModelProto, node: onnx.NodeProto) -> onnx.TensorProto:
    return next(i for i in model.graph.initializer if i.name == node.input[1])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


OPTS = DistillOptions(batch=8, lr=1e-3, checkpoint_every=1, threads=1)


def test_distill_lowers_the_loss_and_records_metadata(student: Path, images: Path):
    reports = []
    out = distill(
        student,
        sample_model(SEG),
        images,
        DistillOptions(batch=8, lr=1e-3, epochs=3, threads=1, val=str(images)),
        on_epoch=reports.append,
    )
    assert [r.epoch for r in reports] == [1, 2, 3]
    assert reports[-1].loss < reports[0].loss
    assert all(r.agreement is not None and 0 <= r.agreement <= 1 for r in reports)
    meta = json.loads({p.key: p.value for p in out.metadata_props}[DISTILL_KEY])
    assert meta["epochs"] == 3 and meta["images"] == 24 and meta["final_loss"] > 0
    assert meta["warmup"] == 0
    before, after = _weights(load(student)), _weights(out)
    assert before.keys() == after.keys()
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert [o.name for o in out.graph.output] == [o.name for o in load(student).graph.output]


@pytest.mark.parametrize(
    "changes",
    [{}, {"warmup": 1.0}, {"hints": 1.0, "dropped": "background"}],
    ids=["defaults", "warmup", "hints+background"],
)
def test_distill_is_deterministic_and_resume_gives_the_same_weights(
    student: Path, images: Path, tmp_path: Path, monkeypatch, changes: dict
):
    opts = dataclasses.replace(OPTS, **changes)
    plain = _weights(distill(student, sample_model(SEG), images, opts))
    again = _weights(distill(student, sample_model(SEG), images, opts))
    for k in plain:
        np.testing.assert_array_equal(plain[k], again[k])
    if changes:  # each changes the steps: a run without it ends elsewhere
        other = _weights(distill(student, sample_model(SEG), images, OPTS))
        assert any(not np.array_equal(plain[k], other[k]) for k in plain)

    from onnxcut.train.trainer import Trainer

    real = Trainer.step
    calls = {"n": 0}

    def dying(self, feeds):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during the third step
            raise KeyboardInterrupt
        return real(self, feeds)

    ckpt = tmp_path / "run.partial"
    monkeypatch.setattr(Trainer, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        distill(student, sample_model(SEG), images, opts, checkpoint=ckpt)
    monkeypatch.setattr(Trainer, "step", real)
    resumed = _weights(
        distill(student, sample_model(SEG), images, opts, checkpoint=ckpt, resume=True)
    )
    for k in plain:
        np.testing.assert_array_equal(resumed[k], plain[k], err_msg=k)


def test_resume_refuses_a_checkpoint_of_another_run(student: Path, images: Path, tmp_path):
    ckpt = tmp_path / "run.partial"
    distill(student, sample_model(SEG), images, OPTS, checkpoint=ckpt)
    other = DistillOptions(batch=8, lr=5e-4, checkpoint_every=1, threads=1)
    with pytest.raises(TrainError, match="another student, teacher, data or options"):
        distill(student, sample_model(SEG), images, other, checkpoint=ckpt, resume=True)


def test_extract_records_the_kept_channels_of_layer_inputs_composed_over_cuts(student: Path):
    kept = read_kept(load(student))
    model = load(sample_model(SEG))
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    relu = next(n for n in model.graph.node if first.output[0] in n.input)
    assert kept[relu.output[0]] == (1, list(range(0, 16, 2)))
    # Every recorded tensor is a layer's data input in the student, of the recorded width.
    index = GraphIndex(load(student))
    readers = {n.input[0] for n in load(student).graph.node if n.op_type == "Conv"}
    assert set(kept) <= readers and len(kept) > 5
    for name, (axis, channels) in kept.items():
        assert index.shape(name)[axis] == len(channels), name
    # Cut the student again: indices stay the original model's.
    again = extract(
        load(student), {"format": "onnxcut.plan/1", "keep": {first.name: [1, 3]}, "outputs": {}}
    )
    assert read_kept(again)[relu.output[0]] == (1, [2, 6])


def test_hints_match_the_student_to_the_teachers_own_channels(student: Path, images: Path):
    """Upstream of the cut's effect the student computes the teacher's kept channels
    exactly, so there the hint's teacher feature equals the student's tensor."""
    from onnxcut import data
    from onnxcut.train.hints import match_hints
    from onnxcut.train.teacher import Teacher

    s, t = load(student), load(sample_model(SEG))
    out = s.graph.output[0].name
    hints = match_hints(s, t, trainable(s), out)
    first = next(n for n in s.graph.node if n.op_type == "Conv")
    relu = next(n for n in s.graph.node if first.output[0] in n.input).output[0]
    assert relu in hints
    pre = data.fit_to_model(data.preprocess_from(s), s)
    x = next(iter(data.batches(sorted(images.glob("*.png"))[:2], pre, 2))).inputs
    feeds = Teacher(t, [0, 4, 6], "softmax", 1.0, hints=hints, hint_weight=1.0).feeds(x, 2)
    probe = onnx.ModelProto()
    probe.CopyFrom(s)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(relu, onnx.TensorProto.FLOAT, None)
    )
    mine = np.concatenate([run_tensor(probe, relu, x[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(feeds[hint_target(relu)], mine, rtol=1e-5, atol=1e-6)


def run_tensor(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    return session(model).run([name], {model.graph.input[0].name: x})[0]


def test_teacher_gives_the_kept_channels_of_each_hint_and_its_scale():
    from onnxcut.train.hints import Hint
    from onnxcut.train.teacher import Teacher

    model = load(seg_net())
    name = _hint_tensors(model)[1]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    )
    hints = {name: Hint(1, (0, 3, 5), 4, 6)}
    teacher = Teacher(model, [0, 2], "softmax", 1.0, hints=hints, hint_weight=2.0)
    x = np.random.default_rng(5).standard_normal((3, 3, 8, 8)).astype(np.float32)
    feeds = teacher.feeds(x, real=2)
    forward = session(probe)
    f = np.concatenate([forward.run([name], {teacher.input: x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(feeds[hint_target(name)], f[:, [0, 3, 5]], rtol=1e-5, atol=1e-6)
    want = 2.0 / (float(np.square(f[:2].astype(np.float64)).sum()) * 3 / 6)
    assert feeds[hint_scale(name)] == pytest.approx(want, rel=1e-4)


def test_a_hint_on_a_near_zero_layer_is_measured_against_the_floor():
    """Relative error against a teacher feature near zero would explode: the energy is
    floored at an RMS of teacher.FLOOR."""
    from onnxcut.train.hints import Hint
    from onnxcut.train.teacher import FLOOR, Teacher

    b = NetBuilder((1, 3, 8, 8), seed=1)
    inner = b.relu(b.conv(b.input, 4, bias=False))
    model = load(b.build([b.conv(inner, 3, k=1)]))
    teacher = Teacher(model, [0, 1, 2], "softmax", 1.0, hints={inner: Hint(1, (0, 2), 4, 4)})
    teacher.hint_factor = 1.0
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    tiny = teacher.feeds(x * 1e-9, 2)[hint_scale(inner)]
    assert tiny == pytest.approx(1.0 / (FLOOR**2 * 2 * 2 * 8 * 8), rel=1e-5)
    normal = teacher.feeds(x, 2)
    energy = float(np.square(normal[hint_target(inner)].astype(np.float64)).sum())
    assert normal[hint_scale(inner)] < tiny and energy > FLOOR**2 * 2 * 2 * 64


def test_distill_with_hints_trains_on_the_features_and_records_the_weight(
    student: Path, images: Path
):
    opts = DistillOptions(batch=8, lr=1e-3, epochs=2, threads=1, hints=1.0)
    reports = []
    out = distill(student, sample_model(SEG), images, opts, on_epoch=reports.append)
    meta = json.loads({p.key: p.value for p in out.metadata_props}[DISTILL_KEY])
    assert meta["hints"] == 1.0 and reports[-1].loss < reports[0].loss
    plain = distill(student, sample_model(SEG), images, dataclasses.replace(opts, hints=0.0))
    # The hint terms add to the loss (the cut layers' inputs differ from the teacher's).
    assert (
        meta["final_loss"]
        > json.loads({p.key: p.value for p in plain.metadata_props}[DISTILL_KEY])["final_loss"]
    )
    # Exactly the student's weights change, by other steps than without hints.
    assert _weights(out).keys() == _weights(plain).keys()
    assert any(not np.array_equal(_weights(out)[k], _weights(plain)[k]) for k in _weights(out))


def test_hints_at_chooses_the_hinted_tensors(student: Path, images: Path):
    from onnxcut.train.hints import match_hints

    s, t = load(student), load(sample_model(SEG))
    params, out = trainable(s), s.graph.output[0].name
    every = match_hints(s, t, params, out)
    assert len(every) > 5
    aspp = match_hints(s, t, params, out, ["*aspp*"])
    assert aspp and set(aspp) < set(every) and all("aspp" in n for n in aspp)
    with pytest.raises(ModelError, match=r"--hints-at \*nowhere\* matches none of the"):
        match_hints(s, t, params, out, ["*nowhere*"])
    opts = DistillOptions(batch=8, lr=1e-3, threads=1, hints=1.0, hints_at=("*aspp*",))
    meta = json.loads(
        {p.key: p.value for p in distill(student, t, images, opts).metadata_props}[DISTILL_KEY]
    )
    assert meta["hints_at"] == ["*aspp*"]


def test_label_masks_mix_in(student: Path, images: Path):
    opts = DistillOptions(batch=8, lr=1e-3, threads=1, masks=str(SCENES / "masks"))
    out = distill(student, sample_model(SEG), images, opts)
    meta = json.loads({p.key: p.value for p in out.metadata_props}[DISTILL_KEY])
    assert meta["labels"] is True and meta["final_loss"] > 0


def test_diverging_loss_stops_and_names_the_step(student: Path, images: Path, tmp_path: Path):
    ckpt = tmp_path / "run.partial"
    opts = DistillOptions(batch=8, lr=1e12, optimizer="sgd", checkpoint_every=1, threads=1)
    with pytest.raises(TrainError, match=r"at step \d+ \(epoch 1\).*run.partial \(step \d+\)"):
        distill(student, sample_model(SEG), images, opts, checkpoint=ckpt)
    with np.load(ckpt) as f:  # the kept checkpoint holds finite weights
        assert all(np.isfinite(f[k]).all() for k in f.files if k.startswith("value/"))


def test_classifier_distills_per_image(tmp_path: Path):
    folder = tmp_path / "digits"
    folder.mkdir()
    for path in sorted((ROOT / "samples/data/digits_cls/val").glob("*/*.png"))[::20]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    model = load(sample_model("resnet_digits_cls"))
    out = model.graph.output[0].name
    sub = extract(
        model,
        {"format": "onnxcut.plan/1", "keep": {}, "outputs": {out: {"axis": 1, "keep": [4, 6]}}},
    )
    result = distill(
        sub, model, folder, DistillOptions(batch=4, lr=1e-3, threads=1, val=str(folder))
    )
    assert json.loads({p.key: p.value for p in result.metadata_props}[DISTILL_KEY])["agreement"]


def _bad(student, teacher, images, **kw):
    return lambda: distill(student, teacher, images, DistillOptions(threads=1, **kw))


def test_bad_inputs_raise_user_errors(student: Path, images: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    teacher = sample_model(SEG)
    with pytest.raises(DataError, match="learning rate must be above 0"):
        _bad(student, teacher, images, lr=0.0)()
    with pytest.raises(DataError, match=r"--warmup 1\.5: a share of the first epoch"):
        _bad(student, teacher, images, warmup=1.5)()
    with pytest.raises(DataError, match="no images"):
        _bad(student, teacher, empty)()
    with pytest.raises(ModelError, match="inputs differ"):
        _bad(student, sample_model("resnet_digits_cls"), images)()
    cut = load(teacher)
    out = cut.graph.output[0].name
    other = extract(
        cut, {"format": "onnxcut.plan/1", "keep": {}, "outputs": {out: {"axis": 1, "keep": [0, 1]}}}
    )
    with pytest.raises(ModelError, match=r"student categories \[4, 6\] are not among"):
        _bad(student, other, images)()
    with pytest.raises(DataError, match=r"--hints -1\.0: a loss weight"):
        _bad(student, teacher, images, hints=-1.0)()
    with pytest.raises(DataError, match=r"--hints-at chooses where hints go"):
        _bad(student, teacher, images, hints_at=("*",))()
    bare = load(student)
    kept = [p for p in bare.metadata_props if p.key != "onnxcut.kept"]
    del bare.metadata_props[:]
    bare.metadata_props.extend(kept)
    with pytest.raises(ModelError, match=r"no onnxcut\.kept metadata.*drop --hints"):
        _bad(bare, teacher, images, hints=1.0)()
    # A teacher whose inner tensors have other names: nothing to match the features to.
    renamed = load(teacher)
    outer = {v.name for v in [*renamed.graph.input, *renamed.graph.output]}
    outer |= {i.name for i in renamed.graph.initializer}
    for node in renamed.graph.node:
        node.input[:] = [i if i in outer or not i else i + "_x" for i in node.input]
        node.output[:] = [o if o in outer else o + "_x" for o in node.output]
    del renamed.graph.value_info[:]
    with pytest.raises(ModelError, match=r"none of the student's onnxcut\.kept tensors matches"):
        _bad(student, renamed, images, hints=1.0)()


def test_op_without_a_rule_on_a_trained_path_names_node_and_freeze(tmp_path: Path):
    b = NetBuilder((1, 3, 8, 8), seed=2)
    first = b.conv(b.input, 4)
    model = load(b.build([b.conv(b.relu(b.instance_norm(first)), 3, k=1)]))
    out = model.graph.output[0].name
    with pytest.raises(
        UnsupportedOpError,
        match=r"\(InstanceNormalization\): no VJP rule on a trained path; freeze.*--freeze",
    ):
        build(model, out, 1, trainable(model))
    node = model.graph.node[0].name
    assert build(model, out, 1, trainable(model, freeze=(node,))).params


def test_cli_distill_writes_the_model_and_errors_are_one_line(
    student: Path, images: Path, tmp_path: Path
):
    out = tmp_path / "out.onnx"
    args = ["distill", str(student), "--teacher", str(sample_model(SEG)), "--data", str(images)]
    result = CliRunner().invoke(cli, [*args, "-o", str(out), "--batch", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert out.exists() and not (tmp_path / "out.onnx.partial").exists()
    assert DISTILL_KEY in {p.key for p in onnx.load(out).metadata_props}
    for extra, text in [
        (["--lr", "-1"], "learning rate must be above 0"),
        (["--warmup", "-0.1"], "a share of the first epoch"),
        (["--hints", "-2"], "a loss weight, 0 or above"),
        (["--hints-at", "*aspp*"], "give --hints a weight above 0"),
        (["--hints", "1", "--hints-at", "*nowhere*"], "matches none of the student's"),
        (["--data", str(tmp_path / "nowhere")], "not a folder of images"),
    ]:
        bad = tmp_path / "bad.onnx"
        result = CliRunner().invoke(cli, [*args, "-o", str(bad), *extra])
        assert result.exit_code == 2, result.output
        assert text in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not bad.exists()


def test_distill_memory_is_flat_in_the_number_of_images(student: Path, tmp_path: Path):
    """Python-side peak memory (numpy included) does not grow with the image count."""
    import tracemalloc

    source = sorted((SCENES / "images").glob("*.png"))[:4]
    peaks = {}
    for n in (8, 40):
        folder = tmp_path / str(n)
        folder.mkdir()
        for i in range(n):
            shutil.copy(source[i % len(source)], folder / f"{i:03d}.png")
        tracemalloc.start()
        distill(student, sample_model(SEG), folder, DistillOptions(batch=4, threads=1))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[40] < 1.25 * peaks[8], peaks


def test_paddle_biases_through_reshape_train():
    """A bias added through Reshape(bias, [1, C, 1, 1]) + Add trains like a Conv bias."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")
    shape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["bias", "shape"], ["b4"], name="reshape"),
        helper.make_node("Add", ["c", "b4"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w, bias, shape],
    )
    model = load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert trainable(model) == ["w", "bias"]
    graph = build(model, "y", 1, trainable(model))
    assert {"w", "bias"} <= {i.name for i in graph.model.graph.input}


def test_padding_rows_of_a_short_batch_change_nothing():
    """Rows with weight 0 (padding a short last batch) leave the loss and the step alone."""
    model = load(seg_net())
    params = trainable(model)
    out = model.graph.output[0].name
    graph = build(model, out, 1, params, optimizer=Optimizer("sgd", 0.1, momentum=0.0), batch=2)
    sess = session(graph.model)
    rng = np.random.default_rng(3)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = _softmax(rng.standard_normal((2, 3, 8, 8)).astype(np.float32))
    base = {
        TARGET: target,
        SCALE: np.array(1.0 / 64, np.float32),
        WEIGHTS: np.array([1.0, 0.0], np.float32),
        LR: np.array(0.1, np.float32),
        **{p: values[p] for p in params},
        **{s: np.zeros_like(values[s.split("/", 2)[2]]) for s in graph.states},
    }
    names = [LOSS, *(updated(p) for p in params)]
    one = sess.run(names, {**base, graph.data: x})
    other = x.copy()
    other[1] = rng.standard_normal((3, 8, 8))
    changed = target.copy()
    changed[1] = changed[1][::-1]
    two = sess.run(names, {**base, graph.data: other, TARGET: changed})
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("opset", [13, 18])
def test_loss_is_the_tempered_kl_to_the_target(opset: int):
    """The graph's loss against numpy: T^2/n sum_rows w p (log p - log softmax(z/T)), the
    softmax spelled for opsets where reductions take axes as attributes and as inputs."""
    model = load(seg_net(opset))
    params = trainable(model)
    out = model.graph.output[0].name
    graph = build(model, out, 1, params, temperature=2.0, batch=2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = _softmax(rng.standard_normal((2, 3, 8, 8)).astype(np.float32) * 2)
    rows = np.array([1.0, 0.5], np.float32)
    scale = 2.0 / (2 * 8 * 8)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    feeds = {
        graph.data: x,
        TARGET: target,
        SCALE: np.array(scale, np.float32),
        WEIGHTS: rows,
        LR: np.array(1e-3, np.float32),
        EPSILON: np.array(1.0, np.float32),
        **{p: values[p] for p in params},
        **{s: np.zeros_like(values[s.split("/", 2)[2]]) for s in graph.states},
    }
    loss = float(session(graph.model).run([LOSS], feeds)[0])
    forward = session(model)
    z = np.concatenate([forward.run(None, {graph.data: x[i : i + 1]})[0] for i in range(2)])
    z = z.astype(np.float64) / 2.0
    log_q = z - z.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    kl = (target * (np.log(target) - log_q)).sum(axis=(1, 2, 3))
    assert loss == pytest.approx(scale * 2.0 * float((kl * rows).sum()), rel=1e-4)


@pytest.mark.parametrize("opset", [13, 18])
def test_teacher_target_is_the_tempered_softmax_over_the_kept_categories(opset: int):
    from onnxcut.train.teacher import Teacher

    model = load(seg_net(opset))
    teacher = Teacher(model, [0, 2], "softmax", 2.0, weight=0.5)
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    feeds = teacher.feeds(x, real=2)
    forward = session(model)
    z = np.concatenate([forward.run(None, {teacher.input: x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(feeds[TARGET], _softmax(z[:, [0, 2]] / 2.0), rtol=1e-5, atol=1e-6)
    assert feeds[SCALE] == pytest.approx(2.0 * 0.5 / (2 * 8 * 8))


@pytest.mark.parametrize("opset", [13, 18])
def test_teacher_can_give_the_dropped_categories_to_background(opset: int):
    """--dropped background: the kept categories keep their own probability under the
    teacher's full softmax, and background takes the rest (what the customised task calls
    those pixels)."""
    from onnxcut.train.teacher import Teacher

    model = load(seg_net(opset))
    teacher = Teacher(model, [0, 2], "softmax", 2.0, fold_into=0)
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    target = teacher.feeds(x, real=2)[TARGET]
    forward = session(model)
    z = np.concatenate([forward.run(None, {teacher.input: x[i : i + 1]})[0] for i in range(2)])
    p = _softmax(z / 2.0)
    want = np.stack([p[:, 0] + p[:, 1], p[:, 2]], axis=1)
    np.testing.assert_allclose(target, want, rtol=1e-5, atol=1e-6)


def test_dropped_background_distills_and_is_refused_without_background(student: Path, images: Path):
    opts = DistillOptions(batch=8, threads=1, dropped="background")
    out = distill(student, sample_model(SEG), images, opts)
    meta = json.loads({p.key: p.value for p in out.metadata_props}[DISTILL_KEY])
    assert meta["dropped"] == "background"
    model = load(sample_model("resnet_digits_cls"))
    head = model.graph.output[0].name
    plan = {"format": "onnxcut.plan/1", "keep": {}, "outputs": {head: {"axis": 1, "keep": [4, 6]}}}
    with pytest.raises(DataError, match="--dropped background needs a softmax segmenter"):
        distill(extract(model, plan), model, images, opts)
    with pytest.raises(DataError, match="--dropped spread: use renormalise or background"):
        distill(student, sample_model(SEG), images, dataclasses.replace(opts, dropped="spread"))


def test_a_batch_spelled_into_reshapes_trains_at_another_batch(tmp_path: Path):
    """A TorchScript export traced at batch 1 writes it into its channel shuffle's Reshape
    targets; distill at batch 2 rewrites them (student and teacher), where onnxruntime had
    refused the training graph."""
    from test_real_exports import shufflenet

    model = load(shufflenet())
    shuffles = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert any(int(numpy_helper.to_array(_const(model, n.input[1]))[0]) == 1 for n in shuffles)
    folder = tmp_path / "digits"
    folder.mkdir()
    copy_images(sorted((ROOT / "samples/data/digits_cls/val").glob("*/*.png"))[:6], folder)
    opts = DistillOptions(batch=4, lr=1e-3, epochs=2, threads=1, hints=0.0)
    reports = []
    distill(model, model, folder, opts, on_epoch=reports.append)
    assert all(np.isfinite(r.loss) for r in reports)


def _const(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_an_onnxruntime_failure_in_the_teacher_is_one_line():
    from onnxcut.train.teacher import Teacher

    teacher = Teacher(load(seg_net()), [0, 2], "softmax", 1.0)

    class Failing:
        def run(self, *args):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Reshape\nkernel details")

    teacher._session = Failing()
    x = np.zeros((3, 3, 8, 8), np.float32)
    with pytest.raises(
        ModelError,
        match=r"teacher on a batch of 3: \[ONNXRuntimeError\].*FAIL : Reshape; a model exported",
    ) as e:
        teacher.feeds(x, 3)
    assert "kernel details" not in str(e.value)


def test_an_onnxruntime_failure_in_a_step_is_one_line_and_the_weights_stay():
    from onnxcut.train.trainer import Trainer

    model = load(seg_net())
    params = trainable(model)
    graph = build(model, model.graph.output[0].name, 1, params, batch=2)
    initial = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    trainer = Trainer(graph, {p: initial[p] for p in params}, Optimizer(), threads=1)

    class Failing:
        def run_with_iobinding(self, binding):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Conv\nstack")

    trainer._session = Failing()
    feeds = {graph.data: np.zeros((2, 3, 8, 8), np.float32), TARGET: np.zeros((2, 3, 8, 8))}
    feeds |= {SCALE: np.float32(1.0), WEIGHTS: np.ones(2, np.float32)}
    with pytest.raises(
        ModelError, match=r"could not run the training step: .*RUNTIME_EXCEPTION : Conv$"
    ):
        trainer.step(feeds)
    assert trainer.step_count == 0
    for p in params:
        np.testing.assert_array_equal(trainer.parameters()[p], initial[p])


def test_initializers_listed_as_inputs_are_declared_once():
    """Old exports (IR 3) list every initializer as a graph input: the training graph
    declares each parameter once, and onnxruntime loads it."""
    model = seg_net()
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
    )
    model = load(model)
    params = trainable(model)
    graph = build(model, model.graph.output[0].name, 1, params, batch=2)
    names = [i.name for i in graph.model.graph.input]
    assert len(names) == len(set(names)) and set(params) <= set(names)
    session(graph.model)  # raised "Duplicate definition-site" before


@pytest.mark.parametrize("name", ["nhwc/seg", "tflite/seg"])
def test_distill_a_channels_last_segmenter_with_its_category_axis(name: str, tmp_path: Path):
    """A TFLite-style segmenter puts categories last: `--category-axis 3` finds them for the
    student, the teacher and the --val agreement alike; without it the student's output is
    read on the wrong axis and the error says so in one line."""
    from corpus.survey import invoke, write_data
    from corpus.variants import VARIANTS

    variant = VARIANTS[name]
    model = tmp_path / "model.onnx"
    onnx.save(variant.build(), model)
    images = write_data(tmp_path, variant.task)["images"]
    scores, cut, out = tmp_path / "s.npz", tmp_path / "cut.onnx", tmp_path / "d.onnx"
    axis = ["--category-axis", "3"]
    for args in (
        ["attribute", model, "--data", images, "-o", scores, "--tau", "0.3", *axis],
        ["extract", model, "--scores", scores, "--classes", "1,2", "-o", cut],
    ):
        assert invoke(args).cell == "ok"
    distill_args = ["distill", cut, "--teacher", model, "--data", images, "--batch", "2"]
    refused = invoke([*distill_args, "-o", out])
    assert refused.cell == "exit 2" and "does not describe output" in refused.output
    assert not out.exists()
    done = invoke([*distill_args, "--val", images, *axis, "-o", out])
    assert done.cell == "ok", done.output
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}[DISTILL_KEY])
    assert meta["images"] == 4 and 0 <= meta["agreement"][0] <= 1
