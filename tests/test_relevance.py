"""Model LEGO routes: exact channel contributions and relevance conservation."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcut.attribution.driver import AttributeOptions, attribute
from onnxcut.attribution.relevance import Route
from onnxcut.errors import DataError
from onnxcut.graph.io import expose_tensors, load
from onnxcut.runtime import run

from conftest import ROOT, copy_images, sample_model
from netbuilder import NetBuilder


@pytest.mark.parametrize(
    "conv",
    [
        dict(k=3),
        dict(k=3, stride=2),
        dict(k=3, dilation=2),
        dict(k=3, group=2),
        dict(k=2, pads=[0, 1, 1, 0]),
        dict(k=3, auto_pad="SAME_UPPER", stride=2),
    ],
)
def test_conv_contributions_match_brute_force(conv):
    b = NetBuilder((1, 4, 9, 9), seed=3)
    y = b.conv(b.input, 6, bias=False, **conv)
    model = load(b.build([y]))
    layer = Route(model, y).layers[0]
    x = np.random.default_rng(0).random((1, 4, 9, 9), np.float32)
    z = Route._contributions(layer, x[0])
    for i in range(4):
        only = np.zeros_like(x)
        only[:, i] = x[:, i]
        per_out = run(model, {"input": only})[y][0].sum((1, 2))
        np.testing.assert_allclose(z[:, i], per_out, rtol=1e-4, atol=1e-4)


def test_relevance_is_conserved_along_a_chain():
    b = NetBuilder((1, 3, 8, 8), seed=1)
    c1 = b.relu(b.conv(b.input, 6))
    c2 = b.relu(b.conv(c1, 5))
    logits = b.gemm(b.flatten(b.gap(c2)), 4)
    model = load(b.build([logits]))
    route = Route(model, logits)
    x = np.random.default_rng(0).random((1, 3, 8, 8), np.float32)
    wanted = [*route.inputs, *route.outputs.values()]
    values = run(expose_tensors(model, wanted), {"input": x}, wanted)
    mags = {
        n: np.abs(values[t][0]).reshape(values[t].shape[1], -1).sum(1)
        for n, t in route.outputs.items()
        if t != logits
    }
    rel = route.run(values, mags, category=2)
    names = [la.name for la in route.layers]
    head, second, first = names[-1], names[-2], names[-3]
    assert rel[head].tolist() == [0, 0, 1, 0]
    # alpha=1, beta=0: each layer passes on exactly what it receives (GAP maps channel to
    # feature one to one), as long as every output channel has a positive contribution.
    assert rel[second].sum() == pytest.approx(1.0, rel=1e-9)
    assert rel[first].sum() == pytest.approx(rel[second].sum(), rel=1e-9)
    assert (rel[first] >= 0).all()


def test_classify_scores_hold_relevance(tmp_path):

    for cls in ("4", "8"):
        (tmp_path / cls).mkdir()
        copy_images(
            sorted((ROOT / "samples/data/digits_cls/val" / cls).glob("*.png"))[:4], tmp_path / cls
        )
    scores = attribute(
        sample_model("resnet_digits_cls"), tmp_path, AttributeOptions(tau=0.5, batch=4)
    )
    assert scores.meta["task"] == "classify" and scores.meta["lrp"] == [1.0, 0.0]
    for layer in scores.layers():
        rel = scores.get("relevance", layer)
        seen = scores.count > 0
        np.testing.assert_allclose(rel[seen].sum(1), scores.count[seen], rtol=1e-6)
        assert (rel[~seen] == 0).all()


def test_top_k_per_class_and_shards(tmp_path):

    from onnxcut.attribution.scores import merge

    for cls in ("1", "4", "8"):
        (tmp_path / cls).mkdir()
        copy_images(
            sorted((ROOT / "samples/data/digits_cls/val" / cls).glob("*.png"))[:6], tmp_path / cls
        )
    model = sample_model("resnet_digits_cls")
    whole = attribute(model, tmp_path, AttributeOptions(top_k=2))
    assert whole.count[[1, 4, 8]].tolist() == [2, 2, 2] and whole.count.sum() == 6
    parts = [attribute(model, tmp_path, AttributeOptions(top_k=2, shard=f"{k}/2")) for k in (1, 2)]
    merged = merge(parts)
    for key in whole.arrays:
        np.testing.assert_array_equal(merged.arrays[key], whole.arrays[key], err_msg=key)
    with pytest.raises(DataError, match="--top-k"):
        attribute(sample_model("deeplab_digits"), tmp_path, AttributeOptions(top_k=2))


def _two_classes(tmp_path, n=3):

    for cls in ("4", "8"):
        (tmp_path / cls).mkdir()
        copy_images(
            sorted((ROOT / "samples/data/digits_cls/val" / cls).glob("*.png"))[:n], tmp_path / cls
        )
    return tmp_path


def test_ort_training_backend_matches_symbolic(tmp_path):
    """Runs where onnxruntime-training is installed (its own environment, see README)."""
    from onnxcut.grad.orttraining import available

    model = sample_model("resnet_digits_cls")
    data = _two_classes(tmp_path)
    if not available():
        from onnxcut.errors import RuntimeMissingError

        with pytest.raises(RuntimeMissingError, match="onnxruntime-training"):
            attribute(model, data, AttributeOptions(tau=0.5, grad="ort-training"))
        pytest.skip("onnxruntime-training not installed here (it needs its own environment)")
    symbolic = attribute(model, data, AttributeOptions(tau=0.5))
    ort = attribute(model, data, AttributeOptions(tau=0.5, grad="ort-training"))
    for key in symbolic.arrays:
        np.testing.assert_allclose(
            ort.arrays[key], symbolic.arrays[key], rtol=1e-4, atol=1e-6, err_msg=key
        )


def test_finite_diff_is_refused_for_attribution(tmp_path):
    with pytest.raises(DataError, match="positive-part"):
        attribute(
            sample_model("resnet_digits_cls"),
            _two_classes(tmp_path, 1),
            AttributeOptions(tau=0.5, grad="finite-diff"),
        )


def test_grouped_conv_after_untraced_channels_runs():
    """A depthwise Conv whose input channels are untraced (after an LRN) still routes
    relevance to its own outputs; it used to fail on a length mismatch."""
    b = NetBuilder((1, 3, 8, 8), seed=2)
    x = b._node("LRN", [b.relu(b.conv(b.input, 4))], size=3)
    dw = b.relu(b.conv(x, 4, group=4))
    logits = b.gemm(b.flatten(b.gap(dw)), 3)
    model = load(b.build([logits]))
    route = Route(model, logits)
    wanted = [*route.inputs, *route.outputs.values()]
    values = run(
        expose_tensors(model, wanted), {"input": np.ones((1, 3, 8, 8), np.float32)}, wanted
    )
    mags = {
        n: np.abs(values[t][0]).reshape(values[t].shape[1], -1).sum(1)
        for n, t in route.outputs.items()
        if t != logits
    }
    rel = route.run(values, mags, category=1)
    depthwise = next(la.name for la in route.layers if la.attrs.get("group") == 4)
    assert rel[depthwise].shape == (4,)
    np.testing.assert_allclose(rel[depthwise].sum(), 1.0, rtol=1e-6)


def test_relevance_flows_through_channel_last_matmuls():
    """ConvNeXt-style MLPs (MatMul on NHWC maps) are route layers along their last axis: with
    positive weights every layer passes on all the relevance it receives."""
    from onnx import numpy_helper

    b = NetBuilder((1, 3, 8, 8), seed=6)
    c1 = b.relu(b.conv(b.input, 4))
    hidden = b.relu(b.matmul(b.transpose(c1, [0, 2, 3, 1]), 12))
    back = b.transpose(b.relu(b.matmul(hidden, 5)), [0, 3, 1, 2])
    logits = b.gemm(b.flatten(b.gap(back)), 3)
    built = b.build([logits])
    for t in built.graph.initializer:  # positive weights: no channel loses its share
        t.CopyFrom(numpy_helper.from_array(np.abs(numpy_helper.to_array(t)), t.name))
    model = load(built)
    route = Route(model, logits)
    assert [la.op for la in route.layers] == ["Conv", "MatMul", "MatMul", "Gemm"]
    wanted = [*route.inputs, *route.outputs.values()]
    x = np.random.default_rng(0).random((1, 3, 8, 8), np.float32)
    values = run(expose_tensors(model, wanted), {"input": x}, wanted)
    mags = {
        n: np.abs(np.moveaxis(values[t][0], route.axes[n] - 1, 0))
        .reshape(values[t].shape[route.axes[n]], -1)
        .sum(1)
        for n, t in route.outputs.items()
        if t != logits
    }
    rel = route.run(values, mags, category=1)
    sizes = [len(rel[la.name]) for la in route.layers]
    assert sizes == [4, 12, 5, 3]
    for la in route.layers:
        assert rel[la.name].sum() == pytest.approx(1.0, rel=1e-9), la.name
