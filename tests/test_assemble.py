"""assemble: exact joins of several parts, shared computation, calibration, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnxcut
from onnxcut.assemble import (
    ASSEMBLY_KEY,
    AssembleOptions,
    Part,
    assemble,
    parse_part,
    teacher_for,
)
from onnxcut.cli.main import cli
from onnxcut.errors import DataError, ModelError
from onnxcut.runtime import session

from conftest import ROOT, copy_images, sample_model
from netbuilder import NetBuilder

K = 6  # categories of the test nets (segmentation: background + 5)
SHAPE = (1, 3, 16, 16)


def classifier(arch: int, seed: int, *, input_name: str = "input", opset: int = 17):
    b = NetBuilder(SHAPE, seed=seed, input_name=input_name, opset=opset)
    x = b.relu(b.bn(b.conv(b.input, 8)))
    if arch == 1:  # residual
        x = b.relu(b.add(x, b.bn(b.conv(x, 8))))
    elif arch == 2:  # deeper, pooled
        x = b.relu(b.conv(b.maxpool(x), 12, k=1))
    return b.build([b.gemm(b.flatten(b.gap(x)), K)])


def segmenter(arch: int, seed: int, *, upsample: bool = True):
    b = NetBuilder(SHAPE, seed=seed)
    x = b.relu(b.conv(b.input, 8))
    if arch == 1:
        x = b.relu(b.conv(b.maxpool(x), 8))
        logits = b.conv(x, K, k=1)
        return b.build([b.resize(logits) if upsample else logits])
    if arch == 2:
        x = b.leaky_relu(b.bn(b.conv(x, 6)))
    return b.build([b.conv(x, K, k=1)])


def run(model, x: np.ndarray) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def categories(model: onnx.ModelProto) -> list:
    meta = {p.key: p.value for p in model.metadata_props}
    return next(iter(json.loads(meta["onnxcut.categories"]).values()))


def assembly(model: onnx.ModelProto) -> dict:
    return json.loads({p.key: p.value for p in model.metadata_props}[ASSEMBLY_KEY])


def expected(parts_out: list[np.ndarray], chosen: list, spatial: bool, background: str):
    """The joined output a reference join of the parts' own outputs gives."""
    cols, cats = [], []
    if spatial:
        bgs = [o[:, :1] for o in parts_out]
        cols.append(bgs[0] if background == "first" else np.maximum.reduce(bgs))
        cats.append([0 if background == "first" else -1, 0])
    for i, (out, cs) in enumerate(zip(parts_out, chosen, strict=True)):
        cs = cs if cs is not None else list(range(1 if spatial else 0, K))
        cs = [c for c in cs if not (spatial and c == 0)]
        cols.append(out[:, cs])
        cats += [[i, c] for c in cs]
    return np.concatenate(cols, axis=1), cats


part_spec = st.tuples(
    st.integers(0, 2),  # architecture
    st.integers(0, 3),  # seed (equal seeds and archs: identical parts)
    st.one_of(st.none(), st.permutations(range(K)).flatmap(lambda p: st.just(p[:3]))),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spatial=st.booleans(),
    specs=st.lists(part_spec, min_size=2, max_size=3),
    background=st.sampled_from(["first", "max"]),
    seed=st.integers(0, 2**16),
)
def test_assembled_channels_equal_the_parts(spatial, specs, background, seed):
    make = segmenter if spatial else classifier
    models = [make(arch, s) for arch, s, _ in specs]
    chosen = [list(c) if c is not None else None for _, _, c in specs]
    parts = [
        Part(m, tuple(c) if c is not None else None) for m, c in zip(models, chosen, strict=True)
    ]
    out = assemble(parts, AssembleOptions(background=background))
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    want, cats = expected([run(m, x) for m in models], chosen, spatial, background)
    np.testing.assert_allclose(run(out, x), want, rtol=1e-5, atol=1e-5)
    assert categories(out) == cats


def test_real_images_of_two_sample_classifiers_are_exact():
    from onnxcut import data

    paths = data.list_images(ROOT / "samples/data/digits_cls/val")[::30]
    resnet, vgg = sample_model("resnet_digits_cls"), sample_model("vgg_digits_cls")
    model = onnxcut.load(resnet)
    pre = data.fit_to_model(data.preprocess_from(model), model)
    x = next(data.batches(paths, pre, len(paths))).inputs
    out = assemble([f"{resnet}:0,1,2,3,4", f"{vgg}:9,8,7,6,5"])
    want = np.concatenate([run(str(resnet), x)[:, :5], run(str(vgg), x)[:, [9, 8, 7, 6, 5]]], 1)
    np.testing.assert_allclose(run(out, x), want, rtol=1e-5, atol=1e-5)
    assert categories(out)[5:] == [[1, 9], [1, 8], [1, 7], [1, 6], [1, 5]]


def test_identical_parts_share_all_but_their_heads():
    m = classifier(1, 0)
    out = assemble([Part(m, (0, 1)), Part(m, (2, 3))])
    n = len(m.graph.node)
    # Both heads are cut differently; every node before them is computed once.
    assert len(out.graph.node) <= n + 4
    assert assembly(out)["shared_nodes"] == n - 1


def _plan(model: onnx.ModelProto, keep_first: list[int], cats: list[int]) -> dict:
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")
    output = model.graph.output[0].name
    return {"keep": {first: keep_first}, "outputs": {output: {"axis": 1, "keep": cats}}}


def test_plans_on_one_model_assemble_as_their_union():
    m = classifier(2, 1)
    a, b = _plan(m, [0, 1, 2, 5], [1, 2]), _plan(m, [2, 3, 5], [2, 4])
    out = assemble([Part(m, plan=a), Part(m, plan=b)])
    union = onnxcut.extract(m, _plan(m, [0, 1, 2, 3, 5], [1, 2, 4]))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(union, x), rtol=1e-5, atol=1e-5)
    assert categories(out) == [[0, 1], [0, 2], [1, 4]]
    flops = onnxcut.summarize(out)["flops"]
    assert flops == onnxcut.summarize(union)["flops"]
    exact = assemble([Part(m, plan=a), Part(m, plan=b)], AssembleOptions(share="exact"))
    assert onnxcut.summarize(exact)["flops"] > flops


def test_softmax_heads_are_cut_under_the_softmax():
    b = NetBuilder(SHAPE, seed=3)
    x = b.relu(b.conv(b.input, 8))
    probs = b.build([b.softmax(b.gemm(b.flatten(b.gap(x)), K))])
    out = assemble([Part(probs, (4, 1)), Part(classifier(0, 0), (2,))])
    cut = onnxcut.extract(probs, {"outputs": {probs.graph.output[0].name: {"keep": [1, 4]}}})
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    # extract renormalises the Softmax over the kept categories; the join keeps that.
    np.testing.assert_allclose(run(out, x)[:, :2], run(cut, x)[:, [1, 0]], rtol=1e-5, atol=1e-6)


def test_teacher_lines_up_with_an_assembled_student():
    a, b = classifier(2, 1), classifier(1, 2)
    student = assemble(
        [Part(a, (4, 1), plan=_plan(a, [0, 3], [1, 4])), Part(b, (0,))],
        AssembleOptions(temperatures=(2.0, 0.5)),
    )
    teacher = teacher_for(student, [a, b])
    assert categories(teacher) == categories(student) == [[0, 4], [0, 1], [1, 0]]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    want = np.concatenate([run(a, x)[:, [4, 1]] / 2.0, run(b, x)[:, [0]] / 0.5], axis=1)
    np.testing.assert_allclose(run(teacher, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="pass 2 teachers"):
        teacher_for(student, [a])


def test_input_shape_names_an_input():
    with pytest.raises(ModelError, match="not a model input"):
        assemble([classifier(0, 0), classifier(1, 1)], AssembleOptions(input_shapes={"y": SHAPE}))


def test_different_input_names_map_onto_one():
    a, b = classifier(0, 0), classifier(1, 1, input_name="x")
    with pytest.raises(ModelError, match="pass --input NAME"):
        assemble([a, b])
    out = assemble([a, b], AssembleOptions(input_name="image"))
    assert [i.name for i in out.graph.input] == ["image"]
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run(out, x)[:, K:], run(b, x), rtol=1e-5, atol=1e-5)


def test_parts_of_different_opsets_are_converted():
    a, b = classifier(0, 0, opset=13), classifier(1, 1)
    out = assemble([a, b])
    assert onnxcut.graph.opset_version(out) == 17
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    np.testing.assert_allclose(run(out, x)[:, :K], run(a, x), rtol=1e-5, atol=1e-5)


def test_resize_outputs():
    big, small = segmenter(0, 0), segmenter(1, 1, upsample=False)
    with pytest.raises(ModelError, match="--resize-outputs"):
        assemble([big, small])
    out = assemble([big, small], AssembleOptions(resize_outputs=True))
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    y = run(out, x)
    assert y.shape == (1, 1 + 2 * (K - 1), 16, 16)
    np.testing.assert_allclose(y[:, :K], run(big, x), rtol=1e-5, atol=1e-5)


def test_calibration_matches_confidences(tmp_path: Path):
    import cv2

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (16, 16, 3), np.uint8))
    a, b = classifier(0, 0), classifier(0, 1)
    for t in b.graph.initializer:  # b's logits on a ten times larger scale
        if t.name.startswith("fc_"):
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 10, t.name))
    out = assemble([a, b], AssembleOptions(calibrate=str(images)))
    ta, tb = (u["temperature"] for u in assembly(out)["units"])
    assert tb / ta > 3
    x = onnxcut.data.to_input(
        rng.integers(0, 255, (16, 16, 3), np.uint8), onnxcut.data.Preprocess(size=(16, 16))
    )[None]
    np.testing.assert_allclose(run(out, x)[:, K:], run(b, x) / tb, rtol=1e-4, atol=1e-5)


def test_parse_part():
    assert parse_part("a.onnx:3,5") == Part("a.onnx", (3, 5))
    assert parse_part("a.onnx") == Part("a.onnx")
    assert parse_part("d/a.onnx@p.json:1") == Part("d/a.onnx", (1,), "p.json")
    with pytest.raises(DataError, match="empty category"):
        parse_part("a.onnx:3,,5")
    with pytest.raises(DataError, match="indices"):
        parse_part("a.onnx:3,x")


def _save(model: onnx.ModelProto, path: Path) -> str:
    onnx.save(model, path)
    return str(path)


def _with_preprocess(model: onnx.ModelProto, mean: float) -> onnx.ModelProto:
    value = {"mean": [mean] * 3, "std": [0.25] * 3}
    model.metadata_props.append(
        onnx.StringStringEntryProto(key="onnxcut.preprocess", value=json.dumps(value))
    )
    return model


def _argmax_net() -> onnx.ModelProto:
    b = NetBuilder(SHAPE)
    return b.build([b.conv(b.input, 4)])


def _no_category_output(tmp: Path) -> str:
    m = classifier(0, 0)
    node = helper.make_node("ArgMax", [m.graph.output[0].name], ["label"], axis=1)
    m.graph.node.append(node)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("label", onnx.TensorProto.INT64, None))
    return _save(m, tmp / "argmax.onnx")


BAD = [
    (
        lambda t: [_save(classifier(0, 0), t / "a.onnx"), str(sample_model("resnet_digits_cls"))],
        "input 'input' differs",
    ),
    (
        lambda t: [
            _save(_with_preprocess(classifier(0, 0), 0.5), t / "a.onnx"),
            _save(_with_preprocess(classifier(1, 0), 0.4), t / "b.onnx"),
        ],
        "preprocessing differs",
    ),
    (lambda t: [_save(classifier(0, 0), t / "a.onnx"), _no_category_output(t)], "no category"),
    (lambda t: [_save(classifier(0, 0), t / "a.onnx") + ":1,2,1"], "lists category 1 twice"),
    (lambda t: [_save(classifier(0, 0), t / "a.onnx") + ":1,9"], "category 9 is not among"),
    (
        lambda t: [
            _save(segmenter(0, 0), t / "a.onnx"),
            _save(segmenter(1, 0, upsample=False), t / "b.onnx"),
        ],
        "differ in size",
    ),
    (
        lambda t: [_save(segmenter(0, 0), t / "a.onnx"), _save(classifier(0, 0), t / "b.onnx")],
        "assemble parts of one task",
    ),
]


@pytest.mark.parametrize(("make", "message"), BAD, ids=[m for _, m in BAD])
def test_cli_bad_inputs(tmp_path: Path, make, message):
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["assemble", *make(tmp_path), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_writes_the_assembly(tmp_path: Path):
    a = _save(classifier(0, 0), tmp_path / "a.onnx")
    b = _save(classifier(1, 1), tmp_path / "b.onnx")
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(cli, ["assemble", f"{a}:1,2", f"{b}:0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model = onnx.load(out)
    assert categories(model) == [[0, 1], [0, 2], [1, 0]]
    assert "wrote" in result.output


def test_a_part_with_nothing_to_join_is_left_out():
    a, b = segmenter(0, 0), segmenter(2, 1)
    out = assemble([Part(a, (2,)), Part(b, (0,))])  # b's background is not the one joined
    assert categories(out) == [[0, 0], [0, 2]]
    assert assembly(out)["parts"][1]["unit"] is None
    assert not any(n.name.startswith("p1/") for n in out.graph.node)


def test_distill_an_assembled_classifier_against_one_teacher_per_part(tmp_path):
    """`distill --teacher A --teacher B` trains an assembly against its parts' models."""
    import shutil

    from click.testing import CliRunner

    from onnxcut.cli.main import cli

    from conftest import ROOT, sample_model

    images = tmp_path / "digits"
    images.mkdir()
    for path in sorted((ROOT / "samples/data/digits_cls/val").glob("*/*.png"))[::30]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    a, b = sample_model("resnet_digits_cls"), sample_model("vgg_digits_cls")
    joined = tmp_path / "joined.onnx"
    result = CliRunner().invoke(cli, ["assemble", f"{a}:0,1,2", f"{b}:3,4", "-o", str(joined)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "tuned.onnx"
    args = ["distill", str(joined), "--teacher", str(a), "--teacher", str(b)]
    result = CliRunner().invoke(
        cli, [*args, "--data", str(images), "-o", str(out), "--batch", "4", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    assert out.exists()
    three = [*args, "--teacher", str(a), "--data", str(images), "-o", str(tmp_path / "x.onnx")]
    result = CliRunner().invoke(cli, three)
    assert result.exit_code == 2 and "pass 2 teachers" in result.output, result.output
    assert not (tmp_path / "x.onnx").exists()


def _cli(*args) -> tuple[int, str]:
    from click.testing import CliRunner

    from onnxcut.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def _deeplab_unet_scenes(tmp_path: Path, n: int):
    """The two sample segmenters and a folder of `n` val scenes."""

    from conftest import ROOT, sample_model

    images = tmp_path / "scenes"
    images.mkdir()
    copy_images(sorted((ROOT / "samples/data/digit_scenes/val/images").glob("*.png"))[:n], images)
    return sample_model("deeplab_digits"), sample_model("unet_digits"), images


def test_distill_a_segmenter_assembled_with_the_max_background(tmp_path):
    """`--background max` joins the parts' background logits with Max, which now trains."""
    a, b, images = _deeplab_unet_scenes(tmp_path, 8)
    joined, out = tmp_path / "joined.onnx", tmp_path / "tuned.onnx"
    code, text = _cli("assemble", f"{a}:3", f"{b}:5", "--background", "max", "-o", joined)
    assert code == 0, text
    code, text = _cli("distill", joined, "--teacher", a, "--teacher", b, "--data", images,
                      "-o", out, "--batch", 4, "--threads", 1)  # fmt: skip
    assert code == 0 and out.exists(), text


def test_recutting_an_assembly_to_one_part_names_the_way_out(tmp_path):
    """The parts not chosen get no gradient: plan says so instead of 'alpha keeps none'."""
    a, b, images = _deeplab_unet_scenes(tmp_path, 12)
    joined, scores, out = tmp_path / "joined.onnx", tmp_path / "s.npz", tmp_path / "cut.onnx"
    assert _cli("assemble", f"{a}:3", f"{b}:5", "-o", joined)[0] == 0
    assert _cli("attribute", joined, "--data", images, "-o", scores, "--tau", 0.7)[0] == 0
    code, text = _cli("extract", joined, "--scores", scores, "--classes", 1, "-o", out)
    assert code == 2, text
    assert "no gradient reaches it" in text and "assemble again" in text
    assert not out.exists()
