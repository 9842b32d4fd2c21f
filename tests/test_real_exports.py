"""What real exports do (issue 13): initializers listed as graph inputs, shape-less types,
constant subgraphs before a bias or BatchNorm, channel shuffles. Every model here runs in
onnxruntime, so `extract` must write a checked model that equals `mask` on it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxcut.channels.deps import ChannelTrace, prunable_param_share, trace
from onnxcut.channels.inspection import summarize
from onnxcut.channels.plan import Plan, parse_plan
from onnxcut.channels.surgery import extract, mask
from onnxcut.graph.io import load
from onnxcut.graph.shapes import dims
from onnxcut.runtime import run

from netbuilder import NetBuilder
from test_surgery import assert_same_on_kept, feeds, random_plan


def keep_all(channels: ChannelTrace) -> Plan:
    return Plan()


def keep_half(channels: ChannelTrace) -> Plan:
    """Keep half of the channel classes of every group a plan may cut, rotated by the
    group's position, so that groups of one size are cut differently."""
    calls = iter(range(len(channels.groups)))

    def half(n: int, _) -> np.ndarray:
        return np.roll(np.arange(n) < max(1, n // 2), next(calls))

    return random_plan(channels, lambda: True, half, {})


def declare_initializers(model: onnx.ModelProto, shaped: bool = True) -> onnx.ModelProto:
    """List every initializer as a graph input too (IR 3 must, later IRs may)."""
    listed = {v.name for v in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims) if shaped else None)
        for t in model.graph.initializer
        if t.name not in listed
    )
    return model


def node_ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def first_conv(model: onnx.ModelProto) -> str:
    return next(n.name for n in model.graph.node if n.op_type == "Conv")


# -- initializers listed as graph inputs ---------------------------------------------------
IR_OPSETS = {3: 9, 4: 9, 5: 10, 6: 11, 7: 13, 8: 17, 9: 19, 10: 21}


def listed_net(ir: int) -> onnx.ModelProto:
    """A residual net whose cut makes every kind of new initializer: sliced in place, copied
    per use (a bias shared by two groups), a rewritten Reshape target, a folded bias."""
    b = NetBuilder((1, 3, 8, 8), opset=IR_OPSETS[ir], ir_version=ir, seed=ir)
    first = b.conv(b.input, 8)
    x = b.relu(b.bn(first))
    y = b.relu(b.reshaped_bias(b.conv(x, 8, bias=False)))
    z = b.conv(y, 8)
    x = b.add(x, b.conv(b.relu(z), 8))
    model = b.build([b.gemm(b.reshape(b.gap(x), [1, 8]), 4)])
    nodes = {n.output[0]: n for n in model.graph.node}
    nodes[z].input[2] = nodes[first].input[2]  # one bias initializer for two groups
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    inputs = [v for v in model.graph.input if v.name in used]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.checker.check_model(declare_initializers(model))
    return model


@pytest.mark.parametrize("make_plan", [keep_all, keep_half])
@pytest.mark.parametrize("ir", sorted(IR_OPSETS))
def test_initializers_listed_as_inputs_stay_declared(ir: int, make_plan):
    model = listed_net(ir)
    plan = make_plan(trace(load(model)))
    assert_same_on_kept(model, plan)  # extract and mask each run the ONNX checker
    for out in (extract(model, plan), mask(model, plan)):
        inits = {t.name: list(t.dims) for t in out.graph.initializer}
        declared = {v.name: dims(v) for v in out.graph.input}
        assert all(declared[n] == d for n, d in inits.items() if n in declared)
        assert ir >= 4 or set(inits) <= set(declared)
        assert set(declared) <= {*inits, "input"}
    if make_plan is keep_half:
        names = {t.name for t in extract(model, plan).graph.initializer}
        assert any(n.endswith("_cut") for n in names)  # the Reshape target
        assert len(names - {t.name for t in model.graph.initializer}) >= 4


# -- shape-less types ---------------------------------------------------------------------
def paddle_net() -> onnx.ModelProto:
    """Opset 11, IR 7, weights in Constant nodes, biases added through Reshape; initializers
    declared as inputs without shapes, value_info and the output without shapes."""
    b = NetBuilder((1, 3, 8, 8), opset=11, ir_version=7, seed=9, weights="constant")
    x = b.relu(b.reshaped_bias(b.conv(b.input, 8, bias=False)))
    x = b.relu(b.reshaped_bias(b.conv(x, 8, bias=False)))
    model = b.build([b.gemm(b.reshape(b.gap(x), [1, 8]), 4)])
    declare_initializers(model, shaped=False)
    model.graph.value_info.extend(
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
        for n in model.graph.node
        for o in n.output
    )
    model.graph.output[0].type.tensor_type.ClearField("shape")
    return model


def test_shapeless_declarations_are_filled_or_dropped():
    model = paddle_net()
    plan = keep_half(trace(load(model)))
    assert plan.keep
    assert_same_on_kept(model, plan)
    cut = extract(model, plan)
    inits = {t.name: list(t.dims) for t in cut.graph.initializer}
    assert all(dims(v) == inits[v.name] for v in cut.graph.input if v.name in inits)
    assert all(v.type.tensor_type.HasField("shape") for v in cut.graph.value_info)
    assert dims(cut.graph.output[0]) == [1, len(plan.outputs[cut.graph.output[0].name].keep)]


def _custom_head(dynamic_batch: bool) -> onnx.ModelProto:
    """An onnxruntime contrib op at the end: ONNX shape inference knows nothing of it."""
    b = NetBuilder((1, 3, 8, 8), seed=10)
    x = b.relu(b.conv(b.relu(b.conv(b.input, 6)), 4))
    b.nodes.append(helper.make_node("Gelu", [x], ["out"], name="gelu", domain="com.microsoft"))
    model = b._model(["out"], check=False)
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if dynamic_batch:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        model.graph.output[0].CopyFrom(
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 8, 8])
        )
    return model


def test_output_of_unknown_rank_stays_so():
    model = _custom_head(dynamic_batch=False)
    channels = trace(load(model))
    first = next(g for g in channels.groups if g.prunable)
    plan = {"keep": {first.producers[0]: [0, 2, 5]}}
    cut = extract(model, plan)
    assert not cut.graph.output[0].type.tensor_type.HasField("shape")
    x = feeds(model)
    np.testing.assert_allclose(run(cut, x)["out"], run(mask(model, plan), x)["out"], atol=1e-6)


def test_fixing_input_shapes_keeps_output_ranks():
    model = _custom_head(dynamic_batch=True)
    assert dims(load(model, {"input": [2, 3, 8, 8]}).graph.output[0]) is not None
    cut = extract(model, {}, input_shapes={"input": [2, 3, 8, 8]})
    assert len(dims(cut.graph.output[0])) == 4


# -- constant subgraphs -------------------------------------------------------------------
def biased_net(spelling: str) -> onnx.ModelProto:
    """The same classifier with plain conv biases or biases added through Reshape + Add."""
    b = NetBuilder((1, 3, 8, 8), seed=4, weights="constant")

    def conv(x: str, cout: int) -> str:
        if spelling == "plain":
            return b.conv(x, cout)
        return b.reshaped_bias(b.conv(x, cout, bias=False))

    x = b.relu(conv(b.input, 8))
    x = b.relu(conv(b.add(x, b.relu(conv(x, 8))), 6))
    return b.build([b.gemm(b.flatten(b.gap(x)), 4)])


def test_reshaped_biases_freeze_nothing():
    plain, reshaped = load(biased_net("plain")), load(biased_net("reshaped"))
    x = feeds(plain)
    (want,), (got,) = run(plain, x).values(), run(reshaped, x).values()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # one function, two spellings
    assert prunable_param_share(trace(reshaped)) == prunable_param_share(trace(plain)) == 1.0
    share = summarize(reshaped)["prunable_param_share"]
    assert share == summarize(plain)["prunable_param_share"]
    assert all(g.reason is None for g in trace(reshaped).groups)


def test_reshaped_biases_cut_exactly_and_stay_subgraphs():
    model = biased_net("reshaped")
    loaded = load(model)
    assert node_ops(extract(model, {})) == node_ops(loaded)  # nothing folded
    assert_same_on_kept(model, keep_half(trace(loaded)))
    # Cutting the residual group replaces its two biases' Reshapes by sliced initializers.
    plan = Plan({first_conv(loaded): (0, 3, 5)})
    assert_same_on_kept(model, plan)
    cut = extract(model, plan)
    assert node_ops(cut).count("Reshape") == node_ops(loaded).count("Reshape") - 2
    assert not any(t.name.startswith("rbias") and t.dims == [8] for t in cut.graph.initializer)


def spelled_bn_net() -> onnx.ModelProto:
    b = NetBuilder((1, 3, 8, 8), seed=6)
    x = b.relu(b.bn_spelled(b.conv(b.input, 8, bias=False)))
    y = b.relu(b.bn_spelled(b.conv(x, 8, bias=False)))
    x = b.relu(b.bn_spelled(b.conv(b.add(x, y), 6, bias=False)))
    return b.build([b.gemm(b.flatten(b.gap(x)), 4)])


def test_batchnorm_spelled_with_constants_is_cut_exactly():
    model = spelled_bn_net()
    channels = trace(load(model))
    assert sum(g.prunable for g in channels.groups) == 2
    assert_same_on_kept(model, keep_half(channels))
    assert_same_on_kept(model, Plan({first_conv(model): (1, 2, 6)}))


def test_weights_cast_from_float16_are_masked_and_sliced():
    b = NetBuilder((1, 3, 8, 8), seed=7)
    x = b.relu(b.conv(b.input, 8))
    model = b.build([b.gemm(b.flatten(b.gap(b.relu(b.conv_fp16(x, 6)))), 3)])
    channels = trace(load(model))
    assert prunable_param_share(channels) == 1.0
    plan = Plan({first_conv(model): (0, 4, 7)})
    assert_same_on_kept(model, plan)
    assert "Cast" not in node_ops(mask(model, plan))  # the zeroed weights replace the subgraph
    assert "Cast" in node_ops(mask(model, {}))


# -- channel shuffle ------------------------------------------------------------------------
def shufflenet() -> onnx.ModelProto:
    """ShuffleNet v2 units: split, a branch with a depthwise conv, concat, shuffle; then a
    stride-2 unit whose two branches are shuffled in four groups."""
    b = NetBuilder((1, 3, 8, 8), seed=5)
    x = b.relu(b.bn(b.conv(b.input, 8)))
    for _ in range(2):
        left, right = b.split(x, [4, 4])
        r = b.relu(b.bn(b.conv(right, 4, 1, bias=False)))
        r = b.bn(b.conv(r, 4, group=4, bias=False))
        r = b.relu(b.bn(b.conv(r, 4, 1, bias=False)))
        x = b.channel_shuffle(b.concat([left, r]), 2)
    left = b.relu(b.conv(b.bn(b.conv(x, 8, stride=2, group=8)), 8, 1))
    right = b.bn(b.conv(b.relu(b.conv(x, 8, 1)), 8, stride=2, group=8))
    x = b.channel_shuffle(b.concat([left, b.relu(b.conv(right, 8, 1))]), 4)
    return b.build([b.gemm(b.flatten(b.gap(b.relu(b.conv(x, 12, 1)))), 5)])


SHUFFLENET = load(shufflenet())
SHUFFLE_TRACE = trace(SHUFFLENET)


def test_shufflenet_groups_are_prunable():
    assert all(g.reason is None for g in SHUFFLE_TRACE.groups)
    assert prunable_param_share(SHUFFLE_TRACE) == 1.0


def test_shuffle_permutes_and_couples_channels():
    shuffles = [n for n in SHUFFLENET.graph.node if n.op_type == "Transpose"]
    assert len(shuffles) == 3
    for swap in shuffles:
        split = next(n for n in SHUFFLENET.graph.node if swap.input[0] in n.output)
        merge = next(n for n in SHUFFLENET.graph.node if swap.output[0] in n.input)
        before = SHUFFLE_TRACE.maps[split.input[0]].slots
        after = SHUFFLE_TRACE.maps[merge.output[0]].slots
        g = dims(next(v for v in SHUFFLENET.graph.value_info if v.name == split.output[0]))[1]
        np.testing.assert_array_equal(after, before.reshape(g, -1).T.reshape(-1))
        classes = SHUFFLE_TRACE.slot_class[before.reshape(g, -1)]
        assert (classes == classes[0]).all()  # channel a of every block: one class


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_shufflenet_extract_equals_mask(data):
    def draw_subset(n: int, _) -> np.ndarray:
        bits = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
        bits[data.draw(st.integers(0, n - 1))] = True
        return bits

    plan = random_plan(SHUFFLE_TRACE, lambda: data.draw(st.booleans()), draw_subset, {})
    assert_same_on_kept(SHUFFLENET, plan)


def test_shufflenet_keep_half_rewrites_every_shuffle_target():
    plan = keep_half(SHUFFLE_TRACE)
    assert_same_on_kept(SHUFFLENET, plan)
    reshapes = [n for n in extract(SHUFFLENET, plan).graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == 6 and all(n.input[1].endswith("_cut") for n in reshapes)


def _shuffle_then_conv(shuffle) -> onnx.ModelProto:
    b = NetBuilder((1, 3, 8, 8), seed=8)
    x = b.relu(b.conv(b.input, 8))
    return b.build([b.gemm(b.flatten(b.gap(b.conv(shuffle(b, x), 6, 1))), 3)])


def _nhwc(b: NetBuilder, x: str) -> str:
    y = b.channel_shuffle_nhwc(b.transpose(x, [0, 2, 3, 1]), 4)
    return b.transpose(y, [0, 3, 1, 2])


def _merge_by_shape(b: NetBuilder, x: str) -> str:
    """x.view(x.size()) after the swap: the merge target is the input's own Shape."""
    n, c, h, w = b.shape(x)
    y = b.transpose(b.reshape(x, [n, 2, c // 2, h, w]), [0, 2, 1, 3, 4])
    return b._node("Reshape", [y, b._node("Shape", [x])])


@pytest.mark.parametrize("shuffle", [_nhwc, _merge_by_shape], ids=["nhwc", "shape"])
def test_shuffle_spellings_are_cut_exactly(shuffle):
    model = _shuffle_then_conv(shuffle)
    channels = trace(load(model))
    assert all(g.reason is None for g in channels.groups)
    assert_same_on_kept(model, keep_half(channels))
    assert_same_on_kept(model, Plan({first_conv(model): (0, 2, 4, 6)}))


def _wrong_swap(b: NetBuilder, x: str) -> str:
    n, c, h, w = b.shape(x)
    y = b.transpose(b.reshape(x, [n, 2, c // 2, h, w]), [0, 1, 2, 4, 3])
    return b.reshape(y, [n, c, h, w])


def _split_read_twice(b: NetBuilder, x: str) -> str:
    n, c, h, w = b.shape(x)
    y = b.reshape(x, [n, 2, c // 2, h, w])
    merged = b.reshape(b.transpose(y, [0, 2, 1, 3, 4]), [n, c, h, w])
    return b.add(merged, b.reshape(b.unary("Relu", y), [n, c, h, w]))


def _computed_count(b: NetBuilder, x: str) -> str:
    n, c, h, w = b.shape(x)
    y = b.transpose(b.reshape(x, [n, 2, c // 2, h, w]), [0, 2, 1, 3, 4])
    hw = b._node("Slice", [b._node("Shape", [x]), b._int64([2]), b._int64([4])])
    target = b._node("Concat", [b._int64([n, c]), hw], axis=0)  # C hard-coded, not a constant
    return b._node("Reshape", [y, target])


@pytest.mark.parametrize(
    ("shuffle", "why"),
    [
        (_wrong_swap, "reshapes across the channel axis"),
        (_split_read_twice, "reshapes across the channel axis"),
        (_computed_count, "ends a channel shuffle with targets it cannot update"),
    ],
    ids=["wrong_swap", "read_twice", "computed_count"],
)
def test_other_channel_splits_still_freeze(shuffle, why):
    model = _shuffle_then_conv(shuffle)
    group = trace(load(model)).group_of(first_conv(model))
    assert group.reason is not None and why in group.reason
    assert "node 'reshape_" in group.reason


@pytest.mark.parametrize(
    "selection",
    [{}, {"flops": 0.6}, {"rank": "l1"}],
    ids=["mass-sets", "budget", "l1"],
)
def test_plans_for_a_shufflenet_extract_exactly(selection):
    """Scores of every layer: make_plan leaves shuffle-coupled groups whole (a per-channel
    choice could empty one of a shuffle's tensors) and cuts the rest exactly."""
    from onnxcut.attribution.scores import Scores
    from onnxcut.attribution.selection import Selection, make_plan

    model = load(shufflenet())
    channels = trace(model)
    layers = {p: len(channels.producer_slots[p]) for p in channels.producer_slots}
    out = model.graph.output[0].name
    scores = Scores.empty(["a", "b"], layers, ("forward", "backward", "taylor"), {"output": out})
    rng = np.random.default_rng(0)
    for key in scores.arrays:
        scores.arrays[key][:] = rng.random(scores.arrays[key].shape)
    scores.count[:] = 1
    plan = make_plan(model, scores, Selection(classes=(1,), **selection))
    assert plan["keep"], "nothing cut"
    assert_same_on_kept(model, parse_plan(plan))
