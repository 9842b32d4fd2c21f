"""Bias compensation: the plan's `compensation` section, measured and applied."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxcut
from onnxcut.attribution.compensation import compensate
from onnxcut.channels.plan import parse_plan
from onnxcut.cli.main import cli
from onnxcut.errors import PlanError

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val" / "images"


def _net(nodes, values: dict, out_shape, opset: int = 17) -> onnx.ModelProto:
    """A (1, 3, 8, 8) -> out_shape model of `nodes`, with `values` as initializers."""
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(v, k) for k, v in values.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _constant_channel_net() -> onnx.ModelProto:
    """1x1 Conv (4 channels; channel 2 a constant 3.0: zero weights, bias 3) -> Relu ->
    1x1 Conv (2 channels) -> output. Without channel 2 the second Conv loses 3 * W[:, 2]."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    w1[2] = 0
    b1 = np.array([0.1, -0.2, 3.0, 0.3], np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    b2 = np.array([0.5, -0.5], np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="conv2"),
    ]
    return _net(nodes, {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, [1, 2, 8, 8])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for i in range(5):
        cv2.imwrite(str(tmp_path / f"{i}.png"), rng.integers(0, 255, (8, 8, 3), np.uint8))
    return tmp_path


def test_a_removed_constant_channel_is_compensated_exactly(pictures: Path):
    model = _constant_channel_net()
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 3]}}
    fixed = compensate(model, plan, pictures)
    assert list(fixed.compensation) == ["conv2"]
    w2 = numpy_helper.to_array(model.graph.initializer[2])
    np.testing.assert_allclose(fixed.compensation["conv2"], 3.0 * w2[:, 2, 0, 0], rtol=1e-6)
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(model, x)
    # 1x1 Convs: no border, so the compensated cut equals the original everywhere.
    np.testing.assert_allclose(_run(onnxcut.extract(model, fixed), x), want, atol=1e-5)
    np.testing.assert_allclose(_run(onnxcut.mask(model, fixed), x), want, atol=1e-5)
    assert np.abs(_run(onnxcut.extract(model, plan), x) - want).max() > 0.1


@pytest.mark.parametrize("name", ["deeplab_digits", "resnet_digits_cls"])
def test_compensated_extract_equals_compensated_mask(name: str, tmp_path: Path):
    """The deltas go in before the cut, so the two stay exactly equal."""
    images = tmp_path / "images"
    images.mkdir()
    copy_images(sorted(SCENES.glob("*.png"))[:6], images)
    model = onnxcut.load(sample_model(name))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    # Keep half the channels of every other Conv: many readers lose inputs.
    width = {t.name: t.dims[0] for t in model.graph.initializer}
    keep = {}
    for node in model.graph.node:
        if node.name in convs[1:-2:2]:
            keep[node.name] = list(range(width[node.input[1]] // 2))
    plan = compensate(model, {"format": "onnxcut.plan/1", "keep": keep}, images, limit=6)
    assert plan.compensation
    shape = [1, 3, 64, 64] if name.startswith("deeplab") else [1, 3, 32, 32]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(
        _run(onnxcut.extract(model, plan), x), _run(onnxcut.mask(model, plan), x), atol=1e-4
    )


def test_bad_compensation_sections():
    model = _constant_channel_net()
    base = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 3]}}
    with pytest.raises(PlanError, match="list of finite numbers"):
        parse_plan({**base, "compensation": {"conv2": ["a", 1]}})
    with pytest.raises(PlanError, match="has 3 values for 2 output channels"):
        onnxcut.extract(model, {**base, "compensation": {"conv2": [1.0, 2.0, 3.0]}})
    with pytest.raises(PlanError, match="not a Conv or Gemm node"):
        onnxcut.extract(model, {**base, "compensation": {"relu1": [1.0]}})


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, Path]:
    """Twelve val scenes and the sample segmenter's scores over them, made with the CLI."""
    root = tmp_path_factory.mktemp("scored")
    images, scores = root / "images", root / "s.npz"
    images.mkdir()
    copy_images(sorted(SCENES.glob("*.png"))[:12], images)
    model = str(sample_model("deeplab_digits"))
    args = ["attribute", model, "--data", str(images), "-o", str(scores), "--tau", "0.7"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    return images, scores


def test_cli_plan_and_extract_compensate(scored: tuple[Path, Path], tmp_path: Path):
    images, scores = scored
    run = CliRunner().invoke
    plan, out = tmp_path / "p.json", tmp_path / "c.onnx"
    model = str(sample_model("deeplab_digits"))
    args = ["plan", str(scores), "--classes", "4,6", "-o", str(plan), "--compensate", str(images)]
    result = run(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(plan.read_text())["compensation"]
    result = run(cli, ["extract", model, "--plan", str(plan), "-o", str(out)])
    assert result.exit_code == 0, result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = tmp_path / "x.onnx"
    args = ["extract", model, "--plan", str(plan), "--compensate", str(empty), "-o", str(refused)]
    result = run(cli, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not refused.exists()


def test_reconstruction_restores_a_removed_constant_channel(pictures: Path):
    from onnxcut.attribution.reconstruction import reconstruct

    model = _constant_channel_net()
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 3]}}
    refit = reconstruct(model, plan, pictures)
    # On an image like those it was fit on (the fit holds where the data lies).
    pre = onnxcut.data.fit_to_model(onnxcut.data.preprocess_from(model), model)
    x = next(onnxcut.data.batches(onnxcut.data.list_images(pictures)[:1], pre, 1)).inputs
    want = _run(model, x)
    got = _run(onnxcut.extract(refit, plan), x)
    # The ridge term keeps it from exact; without the refit the error is about 1.
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert np.abs(_run(onnxcut.extract(model, plan), x) - want).max() > 0.1
    np.testing.assert_allclose(got, _run(onnxcut.mask(refit, plan), x), atol=1e-5)


def _pooled_head_net(pool: str) -> onnx.ModelProto:
    """1x1 Conv (6 channels, channel 5 a copy of channel 0) -> Relu -> a global average
    pool (GlobalAveragePool, or ReduceMean over H and W) -> flatten -> Gemm (4 classes)."""
    rng = np.random.default_rng(2)
    w1 = rng.standard_normal((6, 3, 1, 1)).astype(np.float32)
    b1 = rng.standard_normal(6).astype(np.float32)
    w1[5], b1[5] = w1[0], b1[0]
    w2 = rng.standard_normal((4, 6)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    values = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "axes": np.array([2, 3], np.int64)}
    pooling = {
        "gap": helper.make_node("GlobalAveragePool", ["r1"], ["p"], name="pool"),
        "mean": helper.make_node("ReduceMean", ["r1", "axes"], ["p"], name="pool"),
    }[pool]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        pooling,
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    return _net(nodes, values, [1, 4], opset=18)


@pytest.mark.parametrize("pool", ["gap", "mean"])
def test_a_gemm_after_a_global_pool_is_fit_per_position(pictures: Path, tmp_path_factory, pool):
    """Two images give a pooled Gemm two samples for six unknowns per class; fit per
    position of the pooled map (64 an image) it recovers the copy of a removed channel and
    holds on an image it never saw."""
    from onnxcut.attribution.reconstruction import reconstruct

    model = _pooled_head_net(pool)
    paths = onnxcut.data.list_images(pictures)
    fit_on = tmp_path_factory.mktemp("fit_on")
    copy_images(paths[:2], fit_on)
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 2, 3, 4]}}
    refit = reconstruct(model, plan, fit_on)
    pre = onnxcut.data.fit_to_model(onnxcut.data.preprocess_from(model), model)
    x = next(onnxcut.data.batches(paths[4:5], pre, 1)).inputs  # not fit on
    want = _run(model, x)
    got = _run(onnxcut.extract(refit, plan), x)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max(), (got, want)


def _relu_head_net(activation: str) -> onnx.ModelProto:
    """1x1 Conv (5 channels) -> Relu -> 1x1 Conv (3) -> the activation -> output."""
    rng = np.random.default_rng(3)
    values = {
        "w1": rng.standard_normal((5, 3, 1, 1)).astype(np.float32),
        "b1": np.abs(rng.standard_normal(5)).astype(np.float32) + 0.5,  # all five active
        "w2": rng.standard_normal((3, 5, 1, 1)).astype(np.float32),
        # Outputs mostly past the activation's bounds, but not all: some targets to let go.
        "b2": np.array(
            [-4.0, -2.0, -6.0] if activation in ("relu", "clip") else [-1, 1, -2], np.float32
        ),
        "lo": np.array(0.0, np.float32),
        "hi": np.array(1.5, np.float32),
        "s": np.array([1.0, -0.5, 2.0], np.float32),  # BN: a negative scale flips the bound
        "t": np.array([0.5, -2.0, 1.0], np.float32),
        "mean": np.array([0.2, -0.1, 0.3], np.float32),
        "var": np.array([1.0, 4.0, 0.25], np.float32),
    }
    last = {
        "relu": [helper.make_node("Relu", ["c2"], ["y"], name="act")],
        "clip": [helper.make_node("Clip", ["c2", "lo", "hi"], ["y"], name="act")],
        "hardsigmoid": [helper.make_node("HardSigmoid", ["c2"], ["y"], name="act", alpha=0.5)],
        "bn-relu": [
            helper.make_node(
                "BatchNormalization", ["c2", "s", "t", "mean", "var"], ["z"], name="bn"
            ),
            helper.make_node("Relu", ["z"], ["y"], name="act"),
        ],
    }[activation]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2"),
        *last,
    ]
    return _net(nodes, values, [1, 3, 8, 8])


def _bn_bounds() -> tuple[np.ndarray, np.ndarray]:
    """Where Relu(BN(y)) is flat, per channel, in y: BN(y) = s (y - mean) + t <= 0, that is
    y <= mean - t / s for s > 0 and y >= mean - t / s for s < 0 (s = scale / sqrt(var + eps))."""
    s = np.array([1.0, -0.5, 2.0]) / np.sqrt(np.array([1.0, 4.0, 0.25]) + 1e-5)
    edge = np.array([0.2, -0.1, 0.3]) - np.array([0.5, -2.0, 1.0]) / s
    return np.where(s > 0, edge, -np.inf), np.where(s > 0, np.inf, edge)


FLAT_RANGES = {
    "relu": (0.0, np.inf),
    "clip": (0.0, 1.5),
    "hardsigmoid": (-1.0, 1.0),
    "bn-relu": None,  # per channel: _bn_bounds
}


@pytest.mark.parametrize("activation", sorted(FLAT_RANGES))
def test_a_layer_before_a_relu_is_fit_where_the_relu_passes(
    pictures: Path, monkeypatch, activation
):
    """conv2 loses two of conv1's channels and feeds a ReLU (or Clip): targets the
    activation flattens stop pulling the fit once past its bound, and the activation's
    output comes closer to the original's than a plain least-squares fit's does."""
    from onnxcut.attribution import reconstruction
    from onnxcut.graph.io import GraphIndex

    model = _relu_head_net(activation)
    conv2 = GraphIndex(model).nodes["conv2"]
    got = reconstruction._flat_range(GraphIndex(model), conv2)
    want = FLAT_RANGES[activation]
    if want is None:
        want = _bn_bounds()
    np.testing.assert_allclose(np.asarray(got[0], float), want[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got[1], float), want[1], rtol=1e-6)
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 2, 4]}}
    pre = onnxcut.data.fit_to_model(onnxcut.data.preprocess_from(model), model)
    xs = [b.inputs for b in onnxcut.data.batches(onnxcut.data.list_images(pictures), pre, 1)]

    def error(rounds: int) -> float:
        monkeypatch.setattr(reconstruction, "FLAT_ROUNDS", rounds)
        refit = onnxcut.extract(reconstruction.reconstruct(model, plan, pictures), plan)
        return sum(float(np.square(_run(refit, x) - _run(model, x)).sum()) for x in xs)

    assert error(5) < 0.98 * error(0)


def test_only_a_lone_relu_or_constant_clip_counts_as_flat():
    from onnxcut.attribution import reconstruction
    from onnxcut.graph.io import GraphIndex

    model = _relu_head_net("relu")
    model.graph.output.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, None))
    conv2 = GraphIndex(model).nodes["conv2"]
    assert reconstruction._flat_range(GraphIndex(model), conv2) is None  # also a graph output
    model = _relu_head_net("clip")
    clip = GraphIndex(model).nodes["act"]
    clip.input[2] = "r1"  # a computed bound
    assert reconstruction._flat_range(GraphIndex(model), GraphIndex(model).nodes["conv2"]) is None


def test_reconstruction_keeps_the_sample_task(tmp_path: Path):
    """deeplab_digits cut for two digits: the refit sub-network scores higher, and extract
    of the refit model still equals its mask."""
    from onnxcut.attribution.reconstruction import reconstruct

    images, masks = tmp_path / "images", tmp_path / "masks"
    paths = sorted(SCENES.glob("*.png"))[:40]
    copy_images(paths, images)
    copy_images([SCENES.parent / "masks" / path.name for path in paths], masks)
    model = sample_model("deeplab_digits")
    scores = onnxcut.attribute(model, images, onnxcut.AttributeOptions(tau=0.7))
    plan = onnxcut.make_plan(onnxcut.load(model), scores, onnxcut.Selection((4, 6)))
    refit = reconstruct(model, plan, images, limit=24)
    opts = onnxcut.EvalOptions(masks=str(masks), classes=(4, 6), latency_runs=1)
    plain = onnxcut.evaluate(onnxcut.extract(model, plan), images, opts)["miou"]
    better = onnxcut.evaluate(onnxcut.extract(refit, plan), images, opts)["miou"]
    assert better > plain + 0.05, (plain, better)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(
        _run(onnxcut.extract(refit, plan), x),
        _run(onnxcut.mask(refit, plan), x)[:, [0, 4, 6]],
        atol=1e-4,
    )


def test_cli_reconstruct(scored: tuple[Path, Path], tmp_path: Path):
    images, scores = scored
    run = CliRunner().invoke
    out = tmp_path / "r.onnx"
    model = str(sample_model("deeplab_digits"))
    cut = ["extract", model, "--scores", str(scores), "--classes", "4,6", "-o", str(out)]
    result = run(cli, [*cut, "--reconstruct", str(images)])
    assert result.exit_code == 0 and out.exists(), result.output
    out.unlink()
    both = [*cut, "--reconstruct", str(images), "--compensate", str(images)]
    result = run(cli, both)
    assert result.exit_code == 2 and "drop --compensate" in result.output, result.output
    assert not out.exists()


def test_the_agreement_guard_measures_the_sub_network_cut_gives_it(tmp_path: Path):
    """`extract --min-agreement --reconstruct` measures refit sub-networks: the guard takes
    the function that makes each candidate."""
    from onnxcut.attribution.agreement import AgreementCheck, guarded_plan

    images = tmp_path / "images"
    images.mkdir()
    copy_images(sorted(SCENES.glob("*.png"))[:8], images)
    model = onnxcut.load(sample_model("deeplab_digits"))
    options = onnxcut.AttributeOptions(tau=0.7)
    scores = onnxcut.attribute(sample_model("deeplab_digits"), images, options)
    check = AgreementCheck(model, images, [0, 4, 6], background=0, limit=4)
    made = []

    def cut(m, plan):
        made.append(plan)
        return onnxcut.extract(m, plan)

    def make(sel, check):
        return onnxcut.make_plan(model, scores, sel, check=check)

    plan = guarded_plan(model, make, onnxcut.Selection((4, 6)), check, 0.5, cut=cut)
    assert len(made) > 1 and plan["selection"]["agreement"] >= 0.5


def test_reconstruction_leaves_out_the_images_an_agreement_is_measured_on(
    pictures: Path, tmp_path_factory
):
    """`exclude` drops images from the refit: refitting a folder minus two of its images is
    refitting a folder of the other three; excluding all of them is a one-line error."""
    from onnxcut.attribution.reconstruction import reconstruct
    from onnxcut.errors import DataError

    model = _constant_channel_net()
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 3]}}
    paths = onnxcut.data.list_images(pictures)
    rest = tmp_path_factory.mktemp("rest")  # outside `pictures`, which is listed recursively
    copy_images(paths[2:], rest)
    left_out = reconstruct(model, plan, pictures, exclude={p.resolve() for p in paths[:2]})
    want = reconstruct(model, plan, rest)
    whole = reconstruct(model, plan, pictures)
    values = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
              for m in (left_out, want, whole)]  # fmt: skip
    assert all(np.array_equal(values[0][k], values[1][k]) for k in values[1])
    assert not all(np.array_equal(values[0][k], values[2][k]) for k in values[2])
    with pytest.raises(DataError, match="every image there is one the agreement"):
        reconstruct(model, plan, pictures, exclude={p.resolve() for p in paths})


def test_cli_guard_never_refits_on_its_own_images(scored: tuple[Path, Path], tmp_path: Path):
    """`extract --min-agreement --data D --reconstruct D`: the refit would fit the very
    images the agreement is measured on, so the guard would measure the fit; with no other
    image in D it stops with one line and writes nothing. A --reconstruct folder holding D's
    images and others refits on the others."""
    images, scores = scored
    out = tmp_path / "g.onnx"
    model = str(sample_model("deeplab_digits"))
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    copy_images(sorted(images.glob("*.png"))[:4], held_out)
    guard = ["extract", model, "--scores", str(scores), "--classes", "4,6", "-o", str(out),
             "--min-agreement", "0.5", "--data", str(held_out)]  # fmt: skip
    result = CliRunner().invoke(cli, [*guard, "--reconstruct", str(held_out)])
    assert result.exit_code == 2 and "every image there is one the agreement" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = CliRunner().invoke(cli, [*guard, "--reconstruct", str(images)])
    assert result.exit_code == 0 and out.exists(), result.output


def test_reconstruction_resolves_auto_pad(pictures: Path):
    """TFLite exports write SAME padding as auto_pad: the refit windows follow it."""
    from onnxcut.attribution.reconstruction import reconstruct

    model = _constant_channel_net()
    conv2 = model.graph.node[2]
    w2 = np.random.default_rng(4).standard_normal((2, 4, 3, 3)).astype(np.float32)
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w2, "w2"))
    conv2.attribute.extend([helper.make_attribute("auto_pad", "SAME_UPPER")])
    plan = {"format": "onnxcut.plan/1", "keep": {"conv1": [0, 1, 3]}}
    refit = reconstruct(model, plan, pictures)
    pre = onnxcut.data.fit_to_model(onnxcut.data.preprocess_from(model), model)
    x = next(onnxcut.data.batches(onnxcut.data.list_images(pictures)[:1], pre, 1)).inputs
    want, got = _run(model, x), _run(onnxcut.extract(refit, plan), x)
    plain = _run(onnxcut.extract(model, plan), x)
    # One bias cannot match both the zero-padded border and the inside of an 8x8 map: the
    # fit halves the error, where a window placed wrongly would not.
    assert np.abs(got - want).mean() < 0.5 * np.abs(plain - want).mean()
    np.testing.assert_allclose(got, _run(onnxcut.mask(refit, plan), x), atol=1e-5)
