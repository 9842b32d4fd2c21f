"""attribute, merge and plan on the sample segmenter and classifier."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.scores import load_scores, merge, save_scores
from onnxcut.attribution.selection import Selection, make_plan, mass_set
from onnxcut.cli.main import cli
from onnxcut.errors import DataError
from onnxcut.graph.io import load

from conftest import ROOT, copy_images, sample_model

SCENES = ROOT / "samples" / "data" / "digit_scenes" / "val"
DIGITS = ROOT / "samples" / "data" / "digits_cls" / "val"
SEG = "deeplab_digits"
CLS = "resnet_digits_cls"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A dozen scenes with their label masks."""
    root = tmp_path_factory.mktemp("scenes")
    for kind in ("images", "masks"):
        (root / kind).mkdir()
        copy_images(sorted((SCENES / kind).glob("*.png"))[:12], root / kind)
    return root


@pytest.fixture(scope="module")
def seg_scores(scenes: Path):
    return attribute(sample_model(SEG), scenes / "images", AttributeOptions(tau=0.7, batch=4))


def _assert_same(a, b):
    assert a.categories == b.categories and set(a.arrays) == set(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    np.testing.assert_array_equal(a.count, b.count)


def test_segment_scores_layout(seg_scores):
    s = seg_scores
    assert s.meta["task"] == "segment" and s.meta["images"] == 12
    assert len(s.categories) == 11 and s.count[0] == 12  # background is everywhere
    for layer in s.layers():
        f, b = s.get("forward", layer), s.get("backward", layer)
        assert f.shape == b.shape and f.dtype == np.float64
        seen = s.count > 0
        # Each image adds one probability vector per category it shows.
        np.testing.assert_allclose(f[seen].sum(1), s.count[seen], rtol=1e-6)
        assert (f >= 0).all() and (b >= 0).all()


def test_shards_merge_to_the_single_run(scenes: Path, seg_scores, tmp_path: Path):
    parts = []
    for k in (1, 2, 3):
        opts = AttributeOptions(tau=0.7, batch=4, shard=f"{k}/3")
        parts.append(
            save_scores(
                attribute(sample_model(SEG), scenes / "images", opts), tmp_path / f"s{k}.npz"
            )
        )
    merged = merge(parts)
    _assert_same(merged, seg_scores)
    assert merged.meta["images"] == 12


def test_an_empty_shard_adds_nothing_to_the_merge(tmp_path: Path):
    """More shards than images (or than --top-k selects): the empty ones save and merge."""
    folder = tmp_path / "two"
    folder.mkdir()
    copy_images(sorted((SCENES / "images").glob("*.png"))[:2], folder)
    opts = AttributeOptions(tau=0.7, batch=4)
    single = attribute(sample_model(SEG), folder, opts)
    parts = [
        save_scores(
            attribute(
                sample_model(SEG), folder, AttributeOptions(tau=0.7, batch=4, shard=f"{k}/3")
            ),
            tmp_path / f"s{k}.npz",
        )
        for k in (1, 2, 3)
    ]
    assert [load_scores(p).meta["images"] for p in parts] == [1, 1, 0]
    _assert_same(merge(parts), single)


def test_merge_refuses_other_settings(scenes: Path, seg_scores, tmp_path: Path):
    other = attribute(
        sample_model(SEG), scenes / "images", AttributeOptions(tau=0.8, batch=4, shard="1/4")
    )
    with pytest.raises(DataError, match="'tau' differs"):
        merge([seg_scores, other])


def test_resume_equals_uninterrupted(scenes: Path, seg_scores, tmp_path: Path, monkeypatch):
    checkpoint = tmp_path / "run.partial"
    opts = AttributeOptions(tau=0.7, batch=2, checkpoint_every=4)
    import onnxcut.attribution.driver as attribution

    real = attribution.accumulate
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # killed in the third batch of two, after the checkpoint at 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "accumulate", dying)
    with pytest.raises(KeyboardInterrupt):
        attribute(sample_model(SEG), scenes / "images", opts, checkpoint=checkpoint)
    assert load_scores(checkpoint).meta["done"] == 4
    monkeypatch.setattr(attribution, "accumulate", real)
    # Resumed with batches of three: images are computed alone, so grouping does not matter.
    resumed = attribute(
        sample_model(SEG),
        scenes / "images",
        AttributeOptions(tau=0.7, batch=3, checkpoint_every=4),
        checkpoint=checkpoint,
        resume=True,
    )
    _assert_same(resumed, seg_scores)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_batch_size_does_not_change_scores(scenes: Path, seg_scores, batch: int):
    """Batches of any size (a short last one included) give the scores of batches of four."""
    opts = AttributeOptions(tau=0.7, batch=batch)
    _assert_same(attribute(sample_model(SEG), scenes / "images", opts), seg_scores)


@pytest.mark.parametrize("top_k", [None, 2])
def test_classifier_batches_agree(tmp_path: Path, top_k):
    images = tmp_path / "images"
    images.mkdir()
    copy_images(sorted(DIGITS.rglob("*.png"))[:11], images)
    runs = [
        attribute(sample_model(CLS), images, AttributeOptions(tau=0.5, batch=b, top_k=top_k))
        for b in (1, 4)
    ]
    assert runs[0].count.sum() > 0
    _assert_same(*runs)


def test_category_patterns_differ(tmp_path: Path):
    """Forward vectors of two categories are less alike than those of two halves of one
    category's images, as the Disassembler paper reports."""
    images = sorted((SCENES / "images").glob("*.png"))[:60]
    copy_images(images, tmp_path)
    halves = [
        attribute(sample_model(SEG), tmp_path, AttributeOptions(tau=0.7, shard=f"{k}/2"))
        for k in (1, 2)
    ]
    whole = merge(halves)
    seen = [k for k in range(1, 11) if min(h.count[k] for h in halves) >= 3]
    assert len(seen) >= 4, whole.count

    def cos(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for layer in whole.layers()[-3:]:
        f = whole.mean("forward", layer)
        a, b = (h.mean("forward", layer) for h in halves)
        within = np.mean([cos(a[k], b[k]) for k in seen])
        between = np.mean([cos(f[i], f[j]) for i in seen for j in seen if i < j])
        assert between < within, (layer, between, within)


def test_plan_keeps_head_and_is_never_empty(seg_scores):
    model = load(sample_model(SEG))
    plan = make_plan(model, seg_scores, Selection(classes=(3, 5)))
    assert plan["keep"] and all(plan["keep"].values())
    (output,) = plan["outputs"]
    assert plan["outputs"][output]["keep"] == [0, 3, 5]


def test_mass_set():
    v = np.array([0.5, 0.3, 0.15, 0.05])
    assert mass_set(v, 0.5).tolist() == [True, False, False, False]
    assert mass_set(v, 0.8).tolist() == [True, True, False, False]
    assert mass_set(v, 1.0).tolist() == [True, True, True, True]
    assert not mass_set(np.zeros(3), 0.9).any()


def test_bad_inputs(tmp_path: Path, seg_scores):
    model = sample_model(SEG)
    with pytest.raises(DataError, match="no images"):
        attribute(model, tmp_path)
    (tmp_path / "x.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        attribute(model, tmp_path)
    with pytest.raises(DataError, match="--tau"):
        attribute(model, tmp_path, AttributeOptions(tau=1.5))
    with pytest.raises(DataError, match="size 32x32 does not match"):
        attribute(model, tmp_path, AttributeOptions(preprocess={"size": [32, 32]}))
    with pytest.raises(DataError, match="out of range"):
        make_plan(load(model), seg_scores, Selection(classes=(3, 5), background=42))
    (tmp_path / "bad.npz").write_bytes(b"nonsense")
    with pytest.raises(DataError, match="not a readable scores"):
        load_scores(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="another model"):
        load_scores(save_scores(seg_scores, tmp_path / "s.npz"), "0" * 64)


def test_cli_attribute_plan_extract(tmp_path: Path, scenes: Path):
    runner = CliRunner()
    model = str(sample_model(SEG))
    out = tmp_path / "s.npz"
    result = runner.invoke(
        cli, ["attribute", model, "--data", str(scenes / "images"), "-o", str(out), "--tau", "0.7"]
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "s.npz.partial").exists()
    result = runner.invoke(
        cli, ["plan", str(out), "--classes", "3,5", "-o", str(tmp_path / "p.json")]
    )
    assert result.exit_code == 0, result.output
    bad = runner.invoke(
        cli, ["plan", str(out), "--classes", "3,11", "-o", str(tmp_path / "q.json")]
    )
    assert bad.exit_code == 2 and "--classes 11 is out of range" in bad.output
    assert not (tmp_path / "q.json").exists()


def test_two_category_subnetwork_predicts_them(seg_scores, scenes: Path, tmp_path: Path):
    import onnx

    from onnxcut.channels.surgery import extract
    from onnxcut.evaluation.metrics import EvalOptions, evaluate

    model = sample_model(SEG)
    sub = extract(model, make_plan(load(model), seg_scores, Selection(classes=(3, 5))))
    onnx.save(sub, tmp_path / "sub.onnx")
    assert [d.dim_value for d in sub.graph.output[0].type.tensor_type.shape.dim][1] == 3
    report = evaluate(
        tmp_path / "sub.onnx",
        scenes / "images",
        EvalOptions(masks=str(scenes / "masks"), latency_runs=1),
    )
    assert report["classes"] == [3, 5]
    assert report["per_class"]["3"] > 0.05 and report["per_class"]["5"] > 0.05
    assert (
        report["flops"]
        < evaluate(
            model, scenes / "images", EvalOptions(masks=str(scenes / "masks"), latency_runs=1)
        )["flops"]
    )


def test_two_class_classifier_keeps_accuracy(tmp_path: Path):
    import onnx

    from onnxcut.channels.surgery import extract
    from onnxcut.evaluation.metrics import EvalOptions, evaluate

    for cls in ("4", "8"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        copy_images(sorted((DIGITS / cls).glob("*.png"))[:10], tmp_path / "data" / cls)
    model = sample_model(CLS)
    scores = attribute(model, DIGITS, AttributeOptions(top_k=8))
    sub = extract(model, make_plan(load(model), scores, Selection(classes=(4, 8))))
    onnx.save(sub, tmp_path / "sub.onnx")
    report = evaluate(tmp_path / "sub.onnx", tmp_path / "data", EvalOptions(latency_runs=1))
    assert report["top1"] >= 0.9 and set(report["per_class"]) == {"4", "8"}


def test_round_to_multiples(seg_scores):
    from onnxcut.channels.deps import build_groups

    model = load(sample_model(SEG))
    size = {p: g.channels for g in build_groups(model) for p in g.producers}
    plain = make_plan(model, seg_scores, Selection(classes=(3, 5)))
    rounded = make_plan(model, seg_scores, Selection(classes=(3, 5), round_to=8))
    for layer, keep in rounded["keep"].items():
        assert len(keep) % 8 == 0 or len(keep) == size[layer]
        assert set(plain["keep"][layer]) <= set(keep)


def test_logprob_objective(scenes: Path, seg_scores):
    opts = AttributeOptions(tau=0.7, batch=4, objective="logprob")
    logprob = attribute(sample_model(SEG), scenes / "images", opts)
    assert logprob.meta["objective"] == "logprob" and seg_scores.meta["objective"] == "logit"
    layer = seg_scores.layers()[-2]  # [-1] is the head conv: one-hot positive gradients
    np.testing.assert_array_equal(logprob.get("forward", layer), seg_scores.get("forward", layer))
    assert not np.array_equal(logprob.get("backward", layer), seg_scores.get("backward", layer))
    with pytest.raises(DataError, match="--objective"):
        attribute(sample_model(SEG), scenes / "images", AttributeOptions(objective="margin"))


def test_rank_l1_keeps_counts_and_picks_largest_filters(seg_scores):
    from onnxcut.attribution.selection import filter_l1
    from onnxcut.channels.deps import trace

    model = load(sample_model(SEG))
    by_scores = make_plan(model, seg_scores, Selection(classes=(3, 5)))
    by_l1 = make_plan(model, seg_scores, Selection(classes=(3, 5), rank="l1"))
    assert by_l1["outputs"] == by_scores["outputs"]
    channels = trace(model)
    norms = filter_l1(channels)
    for layer, keep in by_l1["keep"].items():
        assert len(keep) == len(by_scores["keep"][layer])
        total = sum(norms[p] for p in channels.group_of(layer).producers)
        dropped = sorted(set(range(len(total))) - set(keep))
        if dropped:
            assert total[keep].min() >= total[dropped].max()
    with pytest.raises(DataError, match="--rank"):
        make_plan(model, seg_scores, Selection(classes=(3, 5), rank="l2"))


def test_memory_is_flat_in_the_number_of_images(tmp_path: Path):
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
        attribute(sample_model(SEG), folder, AttributeOptions(tau=0.7, batch=4))
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[40] < 1.25 * peaks[8], peaks


def test_grouped_conv_blocks_keep_equal_counts():
    """A grouped Conv needs the same kept count per block: the plan tops up short blocks with
    their best-ranked channels, and the extracted model equals the masked one."""
    from onnxcut.attribution.scores import Scores
    from onnxcut.channels.surgery import extract, mask

    from netbuilder import NetBuilder

    b = NetBuilder((1, 3, 8, 8), seed=3)
    c1 = b.conv(b.input, 8)
    c2 = b.conv(b.relu(c1), 8, group=2)
    model = load(b.build([b.gemm(b.flatten(b.gap(b.relu(c2))), 3)]))
    layers = {n.name: 8 for n in model.graph.node if n.op_type == "Conv"}
    first = next(iter(layers))
    scores = Scores.empty(["a", "b", "c"], layers, ("forward", "backward", "taylor"), {})
    for kind in ("forward", "backward"):
        for name in layers:
            scores.arrays[f"{kind}/{name}"][:] = 1.0  # flat: every channel in the mass set
        # Class 1 lives in channels 0-2 of the first conv: all in block 0 of the grouped conv.
        scores.arrays[f"{kind}/{first}"][1] = [0.4, 0.3, 0.29, 0.01, 0, 0, 0, 0.0]
    scores.count[:] = 1
    plan = make_plan(model, scores, Selection(classes=(1,), alpha=0.9, beta=0.9))
    kept = plan["keep"][first]
    assert len(kept) == 6 and sum(c < 4 for c in kept) == 3 == sum(c >= 4 for c in kept)
    assert {0, 1, 2} <= set(kept)
    x = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    from onnxcut.runtime import run

    out = model.graph.output[0].name
    np.testing.assert_allclose(
        run(extract(model, plan), x)[out], run(mask(model, plan), x)[out], rtol=1e-5, atol=1e-6
    )


def test_channel_last_matmul_layers_are_probed(tmp_path: Path):
    """ConvNeXt-style MLPs (Linear layers on NHWC maps) are scored along their last axis
    and cut like 1x1 convolutions."""
    import onnx

    from onnxcut.channels.surgery import extract, mask
    from onnxcut.runtime import run

    from netbuilder import NetBuilder

    b = NetBuilder((1, 3, 32, 32), seed=5)
    x = b.relu(b.conv(b.input, 8))
    nhwc = b.transpose(x, [0, 2, 3, 1])  # (1, 32, 32, 8)
    hidden = b.relu(b.matmul(nhwc, 24))  # 24 channels on the last axis, 32 on axis 1
    y = b.add(x, b.transpose(b.matmul(hidden, 8), [0, 3, 1, 2]))
    logits = b.gemm(b.flatten(b.gap(y)), 10)
    path = tmp_path / "mlp.onnx"
    onnx_model = b.build([logits])
    onnx.save(onnx_model, path)
    scores = attribute(path, DIGITS, AttributeOptions(top_k=2))
    first_mm = next(n.name for n in onnx_model.graph.node if n.op_type == "MatMul")
    f = scores.get("forward", first_mm)
    assert f.shape == (10, 24)
    seen = scores.count > 0
    np.testing.assert_allclose(f[seen].sum(1), scores.count[seen], rtol=1e-6)
    model = load(path)
    plan = make_plan(model, scores, Selection(classes=(3, 5), alpha=0.5, beta=0.5))
    assert 0 < len(plan["keep"][first_mm]) < 24
    feeds = {"input": np.random.default_rng(0).random((1, 3, 32, 32), np.float32)}
    out = onnx_model.graph.output[0].name
    kept = plan["outputs"].get(out, {}).get("keep", list(range(10)))
    np.testing.assert_allclose(
        run(extract(model, plan), feeds)[out],
        run(mask(model, plan), feeds)[out][:, kept],
        rtol=1e-5,
        atol=1e-5,
    )


def test_softmax_head_is_cut_to_the_chosen_categories():
    """Keras applications and Paddle classifiers end in a Softmax: the cut head outputs the
    chosen categories only, renormalised over them, so its argmax is the original's argmax
    restricted to them; --keep-head keeps every category."""
    from onnxcut.attribution.scores import Scores
    from onnxcut.channels.surgery import extract, mask
    from onnxcut.runtime import session

    from netbuilder import NetBuilder

    b = NetBuilder((1, 3, 8, 8), seed=2)
    c1 = b.conv(b.input, 8)
    logits = b.gemm(b.flatten(b.gap(b.relu(c1))), 4)
    probs = b.softmax(logits)
    model = load(b.build([probs]))
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    scores = Scores.empty(
        ["a", "b", "c", "d"], {conv: 8}, ("forward", "backward", "taylor"), {"output": probs}
    )
    for kind in ("forward", "backward"):
        scores.arrays[f"{kind}/{conv}"][:] = [[1, 1, 1, 1, 0, 0, 0, 0]] * 4
    scores.count[:] = 1
    plan = make_plan(model, scores, Selection(classes=(1, 2)))
    assert plan["outputs"] == {probs: {"axis": 1, "keep": [1, 2]}}
    cut = extract(model, plan)
    assert [d.dim_value for d in cut.graph.output[0].type.tensor_type.shape.dim] == [1, 2]
    full = mask(model, plan)  # the reference: same channels, every category
    full.graph.output.append(onnx.helper.make_tensor_value_info(logits, 1, None))
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    _, z = session(full).run(None, {"input": x})
    (got,) = session(cut).run(None, {"input": x})
    e = np.exp(z[:, [1, 2]] - z[:, [1, 2]].max(axis=1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    meta = {p.key: p.value for p in cut.metadata_props}
    assert json.loads(meta["onnxcut.categories"]) == {probs: [1, 2]}
    whole = make_plan(model, scores, Selection(classes=(1, 2), keep_head=True))
    assert whole["outputs"] == {}
    kept = extract(model, whole)
    assert [d.dim_value for d in kept.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
