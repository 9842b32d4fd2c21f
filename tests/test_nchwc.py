"""The blocked (NCHWc) rewrite of a training graph's convolutions computes what the plain
graph computes: forward Convs and stride-1 ConvTransposes with trained weights, odd channel
counts, asymmetric pads, strides and dilations, and whole training steps."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcut.runtime import session
from onnxcut.train import build, nchwc, trainable
from onnxcut.train.graph import LOSS, WEIGHTS, updated
from onnxcut.train.losses import SCALE, TARGET
from onnxcut.train.optimizers import EPSILON, LR

from netbuilder import NetBuilder

BLOCK = nchwc.block()
pytestmark = pytest.mark.skipif(
    BLOCK is None, reason="onnxruntime has no NCHWc kernels on this CPU: the rewrite is off"
)

CASES = {
    "conv": ("Conv", (2, 20, 9, 9), (24, 20, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    "conv-asym-stride": (
        "Conv", (2, 20, 9, 10), (17, 20, 3, 2), {"pads": [0, 1, 2, 0], "strides": [2, 1]}, True,
    ),
    "conv-dilated": ("Conv", (1, 32, 11, 11), (16, 32, 3, 3), {"dilations": [2, 2]}, False),
    "convtranspose": (
        "ConvTranspose", (2, 20, 7, 8), (20, 5, 3, 3), {"pads": [1, 0, 2, 1]}, False,
    ),
    "convtranspose-dilated": (
        "ConvTranspose", (1, 16, 6, 6), (16, 16, 3, 3),
        {"dilations": [2, 1], "pads": [1, 1, 0, 2]}, True,
    ),
}  # fmt: skip


def _single(op: str, x_shape, w_shape, attrs: dict, bias: bool):
    out_channels = w_shape[0] if op == "Conv" else w_shape[1]
    inputs = ["x", "w", *(["b"] if bias else [])]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"], **attrs)],
        "single",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w_shape)),
            *([helper.make_tensor_value_info("b", TensorProto.FLOAT, [out_channels])] * bias),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_conv_equals_plain(case: str, monkeypatch):
    monkeypatch.setattr(nchwc, "MIN_POSITIONS", 1)
    op, x_shape, w_shape, attrs, bias = CASES[case]
    model = _single(op, x_shape, w_shape, attrs, bias)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal(x_shape).astype(np.float32),
        "w": rng.standard_normal(w_shape).astype(np.float32),
    }
    if bias:
        feeds["b"] = rng.standard_normal(w_shape[0] if op == "Conv" else w_shape[1])
        feeds["b"] = feeds["b"].astype(np.float32)
    want = session(model).run(None, feeds)[0]
    rewritten = nchwc.blocked(_single(op, x_shape, w_shape, attrs, bias))
    assert [n.op_type for n in rewritten.graph.node][-3:] == [
        "ReorderInput", "Conv", "ReorderOutput",
    ]  # fmt: skip
    got = session(rewritten).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_small_or_constant_convs_are_left_alone():
    """Below MIN_POSITIONS output positions, on input channels that do not block, or with a
    constant weight (onnxruntime blocks those itself), the graph is unchanged."""
    op, x_shape, w_shape, attrs, bias = CASES["conv"]
    small = nchwc.blocked(_single(op, x_shape, w_shape, attrs, bias))
    assert [n.op_type for n in small.graph.node] == ["Conv"]
    for channels in (4, 18):  # under a block; not a multiple of 4 (ReorderInput's rule)
        model = _single("Conv", (16, channels, 32, 32), (8, channels, 3, 3), {}, False)
        assert [n.op_type for n in nchwc.blocked(model).graph.node] == ["Conv"]
    constant = _single("Conv", (16, 16, 32, 32), (8, 16, 3, 3), {}, False)
    weight = np.zeros((8, 16, 3, 3), np.float32)
    constant.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    assert [n.op_type for n in nchwc.blocked(constant).graph.node] == ["Conv"]


def test_training_step_blocked_equals_plain(monkeypatch):
    """Every updated parameter and Adam state of one training step, blocked and plain."""
    monkeypatch.setattr(nchwc, "MIN_POSITIONS", 1)
    b = NetBuilder((1, 16, 8, 8), seed=3)
    x = b.relu(b.conv(b.input, 20))
    x = b.relu(b.conv(x, 16, stride=2))
    model = b.build([b.conv(b.resize(x), 4, k=1)])
    params = trainable(model)
    graph = build(model, model.graph.output[0].name, 1, params, batch=2)
    rng = np.random.default_rng(0)
    target = rng.random((2, 4, 8, 8)).astype(np.float32)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    feeds = {
        graph.data: rng.standard_normal((2, 16, 8, 8)).astype(np.float32),
        TARGET: target / target.sum(1, keepdims=True),
        SCALE: np.array(1 / 128, np.float32),
        WEIGHTS: np.ones(2, np.float32),
        LR: np.array(1e-2, np.float32),
        EPSILON: np.array(1.0, np.float32),
        **{p: values[p] for p in params},
        **{s: np.full(values[s.split("/", 2)[2]].shape, 0.01, np.float32) for s in graph.states},
    }
    names = [LOSS, *(updated(n) for n in graph.carried)]
    want = session(graph.model).run(names, feeds)
    rewritten = nchwc.blocked(graph.model)
    assert sum(n.domain == nchwc.DOMAIN and n.op_type == "Conv" for n in rewritten.graph.node) >= 3
    got = session(rewritten).run(names, feeds)
    for name, a, b_ in zip(names, got, want, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5, err_msg=name)


def test_convs_reading_one_tensor_share_its_blocked_copy(monkeypatch):
    monkeypatch.setattr(nchwc, "MIN_POSITIONS", 1)
    b = NetBuilder((1, 16, 8, 8), seed=5)
    branches = [b.conv(b.input, 16, k=k, dilation=d) for k, d in ((1, 1), (3, 1), (3, 2))]
    model = b.build([b.concat(branches)])
    for init in list(model.graph.initializer):  # trained weights: graph inputs
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
        )
    feeds = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    del model.graph.initializer[:]
    feeds["input"] = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    want = session(model).run(None, feeds)[0]
    rewritten = nchwc.blocked(model)
    ops = [n.op_type for n in rewritten.graph.node if n.domain == nchwc.DOMAIN]
    assert ops.count("ReorderInput") == 1 and ops.count("Conv") == 3
    np.testing.assert_allclose(session(rewritten).run(None, feeds)[0], want, rtol=1e-5, atol=1e-4)
