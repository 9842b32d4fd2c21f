"""extract and mask: for any keep-set, the sliced model equals the masked one on kept outputs."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcut.channels.deps import ChannelTrace, trace
from onnxcut.channels.plan import Plan, load_plan, parse_plan, resolve
from onnxcut.channels.surgery import CATEGORIES_KEY, extract, kept_positions, mask
from onnxcut.errors import PlanError
from onnxcut.graph.io import load, save, sha256
from onnxcut.graph.shapes import graph_inputs
from onnxcut.runtime import run

from conftest import SAMPLE_NAMES, sample_model
from netbuilder import NetBuilder


# -- model families -----------------------------------------------------------------------
def _block(b: NetBuilder, x: str, cout: int, stride: int = 1, bn: bool = True) -> str:
    """ResNet basic block; a 1x1 projection when the shape changes."""
    norm = b.bn if bn else (lambda t: t)
    y = b.relu(norm(b.conv(x, cout, stride=stride, bias=not bn)))
    y = norm(b.conv(y, cout, bias=not bn))
    short = x if stride == 1 and b.channels(x) == cout else norm(b.conv(x, cout, 1, stride=stride))
    return b.relu(b.add(y, short))


def resnet(bn: bool = True, weights: str = "initializer") -> onnx.ModelProto:
    b = NetBuilder((1, 3, 16, 16), weights=weights, seed=1)
    x = b.relu(b.bn(b.conv(b.input, 8)) if bn else b.conv(b.input, 8))
    x = _block(b, _block(b, x, 8, bn=bn), 8, bn=bn)
    x = _block(b, _block(b, x, 12, stride=2, bn=bn), 12, bn=bn)
    return b.build([b.gemm(b.flatten(b.gap(x)), 6)], dynamic_batch=True)


def unet() -> onnx.ModelProto:
    b = NetBuilder((1, 3, 16, 16), seed=2)
    e1 = b.relu(b.bn(b.conv(b.relu(b.bn(b.conv(b.input, 6))), 6)))
    e2 = b.relu(b.bn(b.conv(b.maxpool(e1), 10)))
    e3 = b.relu(b.conv(b.maxpool(e2), 12))
    d2 = b.relu(b.bn(b.conv(b.concat([b.conv_transpose(e3, 8), e2]), 8)))
    d1 = b.relu(b.conv(b.concat([e1, b.conv_transpose(d2, 6)]), 6))
    return b.build([b.conv(d1, 5, 1)])


def deeplab() -> onnx.ModelProto:
    """Residual backbone, ASPP with dilations and an image-pooling branch, linear upsample."""
    b = NetBuilder((1, 3, 16, 16), seed=3)
    x = b.relu(b.bn(b.conv(b.input, 8, stride=2)))
    x = _block(b, x, 8)
    branches = [b.relu(b.bn(b.conv(x, 6, 1)))]
    branches += [b.relu(b.bn(b.conv(x, 6, 3, dilation=r))) for r in (2, 3)]
    pooled = b.relu(b.conv(b.gap(x), 6, 1))
    branches.append(b.resize_to(pooled, [8, 8], mode="nearest"))
    x = b.relu(b.bn(b.conv(b.concat(branches), 8, 1)))
    return b.build([b.resize(b.conv(x, 4, 1), 2.0, mode="linear")])


def densenet() -> onnx.ModelProto:
    b = NetBuilder((1, 3, 12, 12), seed=4)
    x = b.conv(b.input, 6)
    for _ in range(3):
        x = b.concat([x, b.conv(b.relu(b.bn(x)), 4)])
    x = b.avgpool(b.conv(b.relu(b.bn(x)), 8, 1))
    return b.build([b.axis_const("Add", b.matmul(b.view_flat(b.gap(x)), 5))])


def mobilenet() -> onnx.ModelProto:
    """Depthwise (and multiplier-2) convs, SE gates, spelled hard-swish, grouped conv, PRelu."""
    b = NetBuilder((1, 3, 16, 16), seed=5)
    x = b.hardswish_spelled(b.bn(b.conv(b.input, 8, stride=2)))
    y = b.hardswish(b.bn(b.conv(x, 8, group=8)))
    y = b.bn(b.conv(b.se(y), 8, 1))
    x = b.add(x, y)
    y = b.prelu(b.channel_const("Mul", b.conv(x, 16, group=8)))
    y = b.channel_const("Add", b.se(y))
    x = b.leaky_relu(b.conv(y, 12, 1, group=4))  # grouped: hint below
    x = b.unary("Sigmoid", b.channel_const("Div", x))
    return b.build([b.gemm(b.flatten(b.gap(x)), 4)])


def tflite() -> onnx.ModelProto:
    """NHWC input, Transposes around convs, residuals widened by a channel Pad in NHWC."""
    b = NetBuilder((1, 3, 12, 12), seed=6, layout="nhwc")
    x = b.relu(b.conv(b.input, 4))
    nhwc = b.transpose(x, [0, 2, 3, 1])
    y = b.transpose(b.conv(b.relu(b.conv(x, 6)), 6), [0, 2, 3, 1])
    z = b.relu(b.add(y, b.pad(nhwc, [0, 0, 0, 0, 0, 0, 0, 2])))  # 4 -> 6 channels
    z = b.transpose(z, [0, 3, 1, 2])
    w = b.conv(b.relu(b.conv(z, 6)), 6)
    z = b.add(z, w)
    return b.build([b.gemm(b.reshape(b.gap(z), [1, 6]), 3)])


def vgg() -> onnx.ModelProto:
    """Flatten -> Gemm, channel Split and Slice, nearest Resize, Reshape into Gemm."""
    b = NetBuilder((1, 3, 8, 8), seed=7)
    x = b.maxpool(b.relu(b.bn(b.conv(b.input, 8))))
    left, right = b.split(x, [3, 5])
    x = b.concat([b.conv(left, 4), b.conv(right, 4), b.slice(x, 2, 6)])
    x = b.resize(b.relu(b.conv(x, 6)), 2.0, "nearest")
    x = b.maxpool(b.maxpool(x))
    head = b.gemm(b.relu(b.gemm(b.flatten(x), 10)), 4)
    aux = b.gemm(b.reshape(x, [1, 6 * 2 * 2]), 2)
    return b.build([head, aux])


def mixing() -> onnx.ModelProto:
    """Ops that mix channels without weights (frozen) beside ones that do not."""
    b = NetBuilder((1, 3, 8, 8), seed=8)
    a = b.relu(b.conv(b.input, 8))
    s = b.softmax(b.conv(a, 6, 1))  # frozen: softmax over channels
    c = b.channel_shuffle(b.conv(s, 6), 2)  # frozen: shuffle
    m = b.add(b.instance_norm(b.conv(a, 6, 1)), b.reduce_mean(b.conv(a, 4), [1]))
    x = b.concat([c, m, b.reduce_mean(b.conv(a, 6), [2], keepdims=True)], axis=2)
    x = b.concat([x, b.conv(a, 6)], axis=2)
    return b.build([b.gemm(b.view_flat(b.maxpool(x)), 3)])


def shared(bn: bool) -> onnx.ModelProto:
    """The PyTorch exporter stores equal initializers once and reaches the copies through
    Identity nodes (zero biases, untrained BatchNorm statistics). Here every Conv bias and
    BatchNormalization parameter of one size and role is one tensor, shared that way."""
    model = resnet(bn=bn)
    inits = {t.name: t for t in model.graph.initializer}
    first: dict[tuple, str] = {}
    nodes = []
    for node in model.graph.node:
        roles = {"Conv": [2], "BatchNormalization": [1, 2, 3, 4]}.get(node.op_type, [])
        for i in (i for i in roles if i < len(node.input) and node.input[i] in inits):
            key = (node.op_type, i, tuple(inits[node.input[i]].dims))
            if key not in first:
                first[key] = node.input[i]
                continue
            alias = f"{node.input[i]}_shared"
            nodes.append(onnx.helper.make_node("Identity", [first[key]], [alias], name=alias))
            node.input[i] = alias
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    return model


FAMILIES: dict[str, Callable[[], onnx.ModelProto]] = {
    "shared_bias": functools.partial(shared, bn=False),
    "shared_bn": functools.partial(shared, bn=True),
    "mixing": mixing,
    "resnet": resnet,
    "resnet_folded_constnodes": functools.partial(resnet, bn=False, weights="constant"),
    "unet": unet,
    "deeplab": deeplab,
    "densenet": densenet,
    "mobilenet": mobilenet,
    "tflite": tflite,
    "vgg": vgg,
}
# Groups feeding or fed by a grouped (not depthwise) conv keep the same count in each conv
# group: per family, channel count -> block size of the drawn keep pattern.
BLOCKS = {"mobilenet": {8: 2, 12: 3}}


@functools.cache
def family(name: str) -> tuple[onnx.ModelProto, ChannelTrace]:
    model = load(FAMILIES[name]())
    return model, trace(model)


# -- plans and comparison -----------------------------------------------------------------
def random_plan(channels: ChannelTrace, draw_bool, draw_subset, blocks: dict[int, int]) -> Plan:
    """Draw kept classes for some cuttable groups, repair empty tensors, write the plan."""
    n_classes = len(channels.class_group)
    kept = np.ones(n_classes, dtype=bool)
    for group in channels.groups:
        if group.reason is not None or not draw_bool():
            continue
        classes = np.flatnonzero(channels.class_group == group.id)
        kept[classes] = draw_subset(len(classes), blocks.get(len(classes)))
    for cmap in channels.maps.values():  # a tensor must keep a channel: give one back
        classes = channels.slot_class[cmap.slots]
        if not kept[classes].any():
            kept[classes[0]] = True
    keep, outputs = {}, {}
    touched = set(channels.class_group[~kept].tolist())
    for group in channels.groups:
        if group.id not in touched:
            continue
        for p in group.producers:
            keep[p] = kept_positions_of(channels, kept, channels.producer_slots[p])
        for out in group.outputs:
            axis = channels.maps[out].axis
            outputs[out] = {"axis": axis, "keep": kept_positions(channels, kept, out).tolist()}
    return parse_plan({"keep": keep, "outputs": outputs})


def kept_positions_of(channels: ChannelTrace, kept: np.ndarray, slots: np.ndarray) -> list[int]:
    return np.flatnonzero(kept[channels.slot_class[slots]]).tolist()


def feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for v in graph_inputs(model):
        d = [x.dim_value if x.dim_value > 0 else batch for x in v.type.tensor_type.shape.dim]
        out[v.name] = rng.standard_normal(d).astype(np.float32)
    return out


def assert_same_on_kept(original: onnx.ModelProto, plan: Plan) -> None:
    cut, masked = extract(original, plan), mask(original, plan)
    x = feeds(original)
    got, want = run(cut, x), run(masked, x)
    channels = trace(load(original))
    kept = resolve(plan, channels)
    for name, full in want.items():
        ref = full
        if name in plan.outputs:
            ref = np.take(ref, kept_positions(channels, kept, name), axis=plan.outputs[name].axis)
        assert got[name].shape == ref.shape, name
        # Float32 error scales with the output's magnitude, not with one kept channel that
        # happens to cancel to near zero.
        scale = float(np.abs(full).max()) or 1.0
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def draw_plan(name: str, data) -> Plan:
    """A random plan for a family, drawn by hypothesis."""
    _, channels = family(name)

    def draw_subset(n: int, block: int | None) -> np.ndarray:
        size = block or n
        bits = np.array(data.draw(st.lists(st.booleans(), min_size=size, max_size=size)))
        if not bits.any():
            bits[data.draw(st.integers(0, size - 1))] = True
        return np.tile(bits, n // size)

    blocks = BLOCKS.get(name, {})
    return random_plan(channels, lambda: data.draw(st.booleans()), draw_subset, blocks)


def check_random_plan(name: str, data) -> None:
    assert_same_on_kept(family(name)[0], draw_plan(name, data))


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_extract_equals_mask(name: str, data):
    check_random_plan(name, data)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(FAMILIES)), data=st.data())
def test_extract_equals_mask_long(name: str, data):
    check_random_plan(name, data)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_keep_everything_is_exact(name: str):
    model, _ = family(name)
    x = feeds(model, seed=1)
    want = run(model, x)
    got = run(extract(model, {}), x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_families_have_cuttable_groups(name: str):
    _, channels = family(name)
    assert sum(g.reason is None for g in channels.groups) >= 2, channels.groups


@pytest.mark.parametrize("bn", [False, True])
def test_initializers_shared_through_identity_freeze_nothing(bn: bool):
    """Each layer gets its own copy of a shared initializer, so sharing freezes no group."""
    frozen = [
        [g.reason for g in trace(load(m)).groups if g.reason] for m in (resnet(bn=bn), shared(bn))
    ]
    assert frozen[1] == frozen[0]
    assert not any(n.op_type == "Identity" for n in load(shared(bn)).graph.node)


# -- the sample models --------------------------------------------------------------------
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_models_extract_equals_mask(name: str):
    path = sample_model(name)
    model = load(path)
    channels = trace(model)
    assert any(g.reason is None for g in channels.groups), channels.groups
    rng = np.random.default_rng(0)

    def draw_subset(n: int, block: int | None) -> np.ndarray:
        bits = rng.random(n) < 0.5
        bits[rng.integers(n)] = True
        return bits

    for _ in range(3):
        plan = random_plan(channels, lambda: rng.random() < 0.7, draw_subset, {})
        assert plan.keep
        assert_same_on_kept(model, plan)
    x = feeds(model)
    want, got = run(model, x), run(extract(path, {}), x)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


# -- plan checks: one line each, naming what is wrong -------------------------------------
def plan_error(model, plan) -> str:
    with pytest.raises(PlanError) as info:
        extract(model, plan)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_plan_files(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "onnxcut.plan/1", "keep": {')
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(bad)
    bad.write_text('{"keep": {}}')
    with pytest.raises(PlanError, match="no 'format' key"):
        load_plan(bad)
    bad.write_text('{"format": "onnxcut.plan/9"}')
    with pytest.raises(PlanError, match="not supported"):
        load_plan(bad)
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "missing.json")
    for data, match in [
        ({"keep": {"c": [1, 1]}}, "twice"),
        ({"keep": {"c": []}}, "is empty"),
        ({"keep": {"c": [-1]}}, "negative"),
        ({"keep": {"c": "0,1"}}, "list of channel indices"),
        ({"kep": {}}, "unknown key 'kep'"),
        ({"outputs": {"logits": {"keep": []}}}, r"outputs\['logits'\] is empty"),
        ({"model_sha256": "abc"}, "64 hex digits"),
    ]:
        with pytest.raises(PlanError, match=match):
            parse_plan(data)


def test_plan_names_unknown_or_non_producer_nodes():
    model, _ = family("resnet")
    assert "'nope', which is not in the model" in plan_error(model, {"keep": {"nope": [0]}})
    relu = next(n.name for n in model.graph.node if n.op_type == "Relu")
    assert "(Relu) owns no channels" in plan_error(model, {"keep": {relu: [0]}})


def test_plan_index_out_of_range():
    model, _ = family("resnet")
    assert "channel 8 out of range; 'conv_11' has 8" in plan_error(
        model, {"keep": {"conv_11": [8]}}
    )


def test_plan_touching_frozen_group_says_why():
    model, _ = family("mixing")
    message = plan_error(model, {"keep": {"conv_7": [0, 1]}})
    assert "group 1 is frozen: node 'softmax_8' (Softmax) mixes channels" in message


def test_coupled_producers_that_disagree_are_both_named():
    model, _ = family("resnet")
    message = plan_error(model, {"keep": {"conv_3": [0, 1, 2], "conv_19": [0, 1]}})
    assert "keep['conv_3'] and keep['conv_19'] disagree" in message
    assert extract(model, {"keep": {"conv_3": [0, 1], "conv_19": [0, 1]}})  # agreeing is fine


def test_sha256_mismatch(tmp_path: Path):
    model, _ = family("resnet")
    path = save(model, tmp_path / "m.onnx")
    other = "0" * 64
    assert "not this model's" in plan_error(path, {"model_sha256": other, "keep": {}})
    assert extract(path, {"model_sha256": sha256(path), "keep": {"conv_11": [0]}})
    # A plan made from a file applies to that file loaded in memory (make_plan, then extract).
    assert extract(load(path), {"model_sha256": sha256(path), "keep": {"conv_11": [0]}})


def test_cutting_a_graph_output_needs_the_outputs_section():
    model, _ = family("resnet")
    message = plan_error(model, {"keep": {"gemm_90": [0, 1]}})
    assert "add 'gemm_90_out' to the plan's outputs section" in message
    assert "not a graph output" in plan_error(model, {"outputs": {"x": {"keep": [0]}}})
    bad_axis = {"outputs": {"gemm_90_out": {"axis": 0, "keep": [0]}}}
    assert "axis 0 given, its channels are on axis 1" in plan_error(model, bad_axis)


def test_a_tensor_left_with_no_channel():
    model, _ = family("vgg")  # slice(x, 2, 6) of conv_3's channels
    message = plan_error(model, {"keep": {"conv_3": [0, 1, 6, 7]}})
    assert "leaves tensor 'slice_22_out'" in message and "no channel" in message


def test_grouped_conv_needs_even_groups():
    model, _ = family("mobilenet")
    message = plan_error(model, {"keep": {"conv_66": [0, 1, 2, 3]}})
    assert "group=4) would keep [3, 1, 0, 0] output channels" in message


# -- what extract writes ------------------------------------------------------------------
def test_extract_records_categories_and_composes():
    model, _ = family("unet")
    once = extract(model, {"outputs": {"conv_57_out": {"keep": [0, 2, 4]}}})
    props = {p.key: p.value for p in once.metadata_props}
    assert json.loads(props[CATEGORIES_KEY]) == {"conv_57_out": [0, 2, 4]}
    twice = extract(once, {"outputs": {"conv_57_out": {"keep": [0, 2]}}})
    props = {p.key: p.value for p in twice.metadata_props}
    assert json.loads(props[CATEGORIES_KEY]) == {"conv_57_out": [0, 4]}
    assert twice.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2


def test_untouched_initializers_stay_bit_identical():
    model, _ = family("resnet")
    cut = extract(model, {"keep": {"conv_45": [0, 3, 5]}})
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    after = {t.name: t.SerializeToString() for t in cut.graph.initializer}
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed and all(k.startswith(("conv_w", "conv_b", "bn_")) for k in changed)
    assert len(changed) <= 8  # conv_45's weights and bias, its BN and the next conv's weights
    assert [n.op_type for n in cut.graph.node] == [n.op_type for n in model.graph.node]


def test_mask_keeps_shapes_and_zeroes_consumer_weights():
    model, _ = family("resnet")
    masked = mask(model, {"keep": {"conv_45": [0, 3, 5]}})
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in masked.graph.initializer}
    assert all(after[k].shape == v.shape for k, v in before.items())
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert len(changed) == 1  # the one conv that reads conv_45's channels
    w = after[changed[0]]  # (cout, cin, kh, kw)
    assert not w[:, [1, 2, 4]].any() and w[:, [0, 3, 5]].all()


# -- the CLI --------------------------------------------------------------------------------
def cli_run(*args):
    from click.testing import CliRunner

    from onnxcut.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def resnet_files(tmp_path: Path) -> tuple[Path, Path]:
    model = save(family("resnet")[0], tmp_path / "resnet.onnx")
    plan = tmp_path / "plan.json"
    data = {"keep": {"conv_45": [0, 3, 5]}, "outputs": {"gemm_90_out": {"keep": [1, 2]}}}
    parse_plan(data).save(plan)
    return model, plan


def test_cli_extract_and_mask(resnet_files, tmp_path: Path):
    model, plan = resnet_files
    result = cli_run("extract", model, "--plan", plan, "-o", tmp_path / "cut.onnx")
    assert result.exit_code == 0, result.output
    assert "params:" in result.output and "FLOPs:" in result.output and "->" in result.output
    cut = onnx.load(tmp_path / "cut.onnx")
    assert cut.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 2
    result = cli_run("mask", model, "--plan", plan, "-o", tmp_path / "masked.onnx")
    assert result.exit_code == 0, result.output
    x = feeds(cut)
    got, want = run(cut, x)["gemm_90_out"], run(tmp_path / "masked.onnx", x)["gemm_90_out"]
    np.testing.assert_allclose(got, want[:, [1, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("verb", ["extract", "mask"])
def test_cli_bad_inputs_exit_2_and_write_nothing(resnet_files, tmp_path: Path, verb: str):
    model, plan = resnet_files
    out = tmp_path / "out.onnx"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "onnxcut.plan/1", "keep": {"conv_99": [0]}}))
    result = cli_run(verb, model, "--plan", bad, "-o", out)
    assert result.exit_code == 2 and "'conv_99', which is not in the model" in result.output
    result = cli_run(verb, model, "--plan", plan, "-o", model)
    assert result.exit_code == 2 and "output is the input model" in result.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_cli_inspect_lists_groups(resnet_files):
    model, _ = resnet_files
    result = cli_run("inspect", model, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    group = report["groups"][0]
    assert set(group) == {"id", "producers", "consumers", "channels", "prunable", "reason"}
    assert group["producers"] == ["conv_3", "conv_19", "conv_36"] and group["prunable"]
    assert 0.5 < report["prunable_param_share"] <= 1.0
    text = cli_run("inspect", model).output
    assert "channel groups: 7, 6 prunable" in text and "frozen: its channels reach" in text


@pytest.fixture(scope="module")
def noise_images(tmp_path_factory) -> Path:
    """Unlabeled images to refit on: random pixels (preprocessing resizes them)."""
    import cv2

    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(3)
    for i in range(4):
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 255, (24, 24, 3), np.uint8))
    return root


@pytest.mark.parametrize("name", sorted(FAMILIES))
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reconstructed_extract_equals_reconstructed_mask(name: str, data, noise_images: Path):
    """Refit layers (onnxcut.reconstruct) are ordinary weights: the cut stays exact."""
    from onnxcut.attribution.reconstruction import reconstruct

    plan = draw_plan(name, data)
    assert_same_on_kept(reconstruct(family(name)[0], plan, noise_images, limit=4), plan)
