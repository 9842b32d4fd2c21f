"""Channel groups: what couples, what maps by offset or block, and what freezes and why."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxcut.channels.compute_rules import SPATIAL, UNARY
from onnxcut.channels.deps import ChannelGroup, build_groups, trace
from onnxcut.channels.registry import CHANNEL_RULES, rule
from onnxcut.channels.surgery import extract, mask
from onnxcut.graph.io import load
from onnxcut.runtime import run

from conftest import conv_bn_net
from netbuilder import NetBuilder


def groups_by_producer(model: onnx.ModelProto) -> dict[str, ChannelGroup]:
    return {p: g for g in build_groups(model) for p in g.producers}


def producer(model: onnx.ModelProto, tensor: str) -> str:
    return next(n.name for n in model.graph.node if tensor in n.output)


def test_residual_add_couples_producers():
    model = conv_bn_net()
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    groups = groups_by_producer(model)
    assert groups[convs[0]] is groups[convs[1]]
    assert groups[convs[0]].prunable and groups[convs[0]].channels == 8


def test_concat_maps_by_offset_and_keeps_groups_apart():
    b = NetBuilder()
    a, c = b.conv(b.input, 4), b.conv(b.input, 6)
    out = b.conv(b.concat([a, c]), 3)
    model = b.build([out])
    groups = groups_by_producer(model)
    assert groups[producer(model, a)] is not groups[producer(model, c)]
    channels = trace(load(model))
    cat = channels.maps[model.graph.node[-2].output[0]]
    assert cat.axis == 1 and len(cat.slots) == 10
    assert producer(model, out) in groups[producer(model, a)].consumers


def test_depthwise_couples_input_and_output():
    b = NetBuilder()
    x = b.conv(b.input, 6)
    y = b.conv(b.relu(b.conv(x, 6, group=6)), 4, 1)
    model = b.build([y])
    groups = groups_by_producer(model)
    assert producer(model, x) in groups and len(groups) == 2  # the depthwise conv owns nothing


def test_se_gate_couples_gate_producer_with_gated_tensor():
    b = NetBuilder()
    x = b.conv(b.input, 8)
    model = b.build([b.conv(b.se(x), 4, 1)])
    group = groups_by_producer(model)[producer(model, x)]
    assert len(group.producers) == 2 and group.prunable


def test_flatten_maps_each_channel_to_its_block():
    b = NetBuilder((1, 3, 4, 4))
    x = b.conv(b.input, 5)
    flat = b.flatten(x)
    model = b.build([b.gemm(flat, 2)])
    channels = trace(load(model))
    slots = channels.maps[flat].slots
    assert slots.shape == (80,)
    assert (slots.reshape(5, 16) == slots.reshape(5, 16)[:, :1]).all()


def test_nhwc_pad_widening_maps_by_offset():
    b = NetBuilder((1, 3, 8, 8), layout="nhwc")
    x = b.conv(b.input, 4)
    nhwc = b.transpose(x, [0, 2, 3, 1])
    wide = b.pad(nhwc, [0, 0, 0, 0, 0, 0, 0, 2])
    conv = b.conv(x, 6)
    y = b.transpose(conv, [0, 2, 3, 1])
    s = b.add(y, wide)
    model = b.build([b.gemm(b.flatten(b.gap(b.transpose(s, [0, 3, 1, 2]))), 2)])
    channels = trace(load(model))
    assert channels.maps[wide].axis == 3
    group = channels.group_of(producer(model, conv))
    assert producer(model, x) in group.producers and group.channels == 6 and group.prunable


def test_graph_output_freezes_until_outputs_section():
    model = conv_bn_net()
    head = groups_by_producer(model)[model.graph.node[-1].name]
    assert not head.prunable and head.reason is None
    assert head.outputs == [model.graph.output[0].name]
    assert "outputs section" in head.frozen_reason


def _frozen(model: onnx.ModelProto, tensor: str) -> str:
    group = groups_by_producer(model)[producer(model, tensor)]
    assert not group.prunable
    return group.reason


def _head(b: NetBuilder, x: str) -> onnx.ModelProto:
    return b.build([b.gemm(b.flatten(b.gap(x)), 2)])


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda b, x: b.softmax(x), "Softmax"),
        (
            lambda b, x: b.reshape(
                b.transpose(b.reshape(x, [1, 2, 2, 16, 16]), [0, 1, 2, 4, 3]), [1, 4, 16, 16]
            ),
            "channel shuffle",
        ),
        (lambda b, x: b.reduce_mean(x, [1]), "reduces over them"),
        (lambda b, x: b._node("LRN", [x], size=3), "mixes channels"),
        (lambda b, x: b._node("CustomOp", [x], domain="acme"), "no channel rule"),
        (lambda b, x: b._node("Foo", [x]), "no channel rule"),
        (lambda b, x: b.add(x, b.input), "untraced tensor"),
    ],
)
def test_unprovable_ops_freeze_with_reason(make, why):
    b = NetBuilder()
    x = b.conv(b.input, 4, 1) if why != "untraced tensor" else b.conv(b.input, 3)
    y = make(b, x)
    model = b._model([y], check=False) if why == "no channel rule" else b.build([b.conv(y, 2)])
    assert why in _frozen(model, x)


def test_shape_arithmetic_on_the_channel_count_freezes():
    b = NetBuilder()
    x = b.conv(b.input, 4)
    c = b._node("Gather", [b._node("Shape", [x]), b._int64([1])], axis=0)
    doubled = b._node("Mul", [c, b._int64([2])])
    flat = b._node(
        "Reshape", [x, b._node("Concat", [b._int64([1]), doubled, b._int64([-1])], axis=0)]
    )
    model = b.build([flat])
    assert "computes with it" in _frozen(model, x)


def test_view_flat_through_shape_ops_stays_prunable():
    b = NetBuilder()
    x = b.conv(b.input, 4)
    model = b.build([b.gemm(b.view_flat(b.gap(x)), 2)])
    assert groups_by_producer(model)[producer(model, x)].prunable


def test_maxpool_indices_freeze():
    b = NetBuilder()
    x = b.conv(b.input, 4)
    _, idx = b._node("MaxPool", [x], n_out=2, kernel_shape=[2, 2], strides=[2, 2])
    model = b.build([b._node("Cast", [idx], to=onnx.TensorProto.FLOAT)])
    assert "indices" in _frozen(model, x)


def test_resize_to_sizes_from_another_tensor_freezes():
    b = NetBuilder()
    x, y = b.conv(b.input, 4), b.conv(b.input, 6)
    sizes = b._node("Shape", [y])
    model = b.build([b._node("Resize", [x, "", "", sizes], mode="nearest")])
    assert "computed sizes" in _frozen(model, x)


def test_duplicate_rule_raises():
    trace(load(conv_bn_net()))  # registers the rule modules
    with pytest.raises(ValueError, match="duplicate channel rule for Relu"):
        rule("Relu")(lambda t, node: None)


FLOAT_UNARY = sorted(set(UNARY) - {"Not", "IsNaN", "IsInf", "Cast", "Log", "Sqrt"})


@pytest.mark.parametrize("op", FLOAT_UNARY + sorted(SPATIAL))
def test_channelwise_rule_cuts_exactly(op):
    """Every same-channel rule: conv -> op -> conv is prunable and extract equals mask."""
    b = NetBuilder((1, 3, 8, 8), opset=20 if op in ("Gelu", "Mish") else 17)
    x = b.conv(b.input, 6)
    if op == "Clip":
        y = b.clip(x)
    elif op in SPATIAL and not op.startswith("Global"):
        y = b._node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
    else:
        y = b.unary(op, x)
    model = b.build([b.conv(y, 3, 1)])
    assert op in CHANNEL_RULES
    group = groups_by_producer(model)[producer(model, x)]
    assert group.prunable, group.reason
    plan = {"keep": {producer(model, x): [0, 2, 5]}}
    feed = {"input": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    got = run(extract(model, plan), feed)
    want = run(mask(model, plan), feed)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_unknown_domain_node_is_not_traced_by_default_rule():
    b = NetBuilder()
    x = b.conv(b.input, 4)
    node = helper.make_node("Relu", [x], ["y"], name="custom_relu", domain="acme")
    b.nodes.append(node)
    model = b._model(["y"], check=False)
    assert "no channel rule" in _frozen(model, x)
