"""Loading real exports: every normalisation load() promises, and the bad files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcut
from onnxcut.channels.inspection import count_params
from onnxcut.errors import ModelError, OutputError
from onnxcut.graph.shapes import dims, graph_inputs, parse_input_shapes, require_static
from onnxcut.runtime import run

from conftest import conv_bn_net
from netbuilder import NetBuilder


def _feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    shape = [d if isinstance(d, int) else 1 for d in dims(graph_inputs(model)[0])]
    return {graph_inputs(model)[0].name: np.random.default_rng(seed).random(shape, np.float32)}


def test_constant_node_weights_become_initializers():
    built = conv_bn_net(weights="constant")
    assert any(n.op_type == "Constant" for n in built.graph.node)
    loaded = onnxcut.load(built)
    assert not any(n.op_type == "Constant" for n in loaded.graph.node)
    assert count_params(loaded) == count_params(onnxcut.load(conv_bn_net()))
    feeds = _feed(built)
    np.testing.assert_array_equal(
        run(built, feeds)[built.graph.output[0].name],
        run(loaded, feeds)[built.graph.output[0].name],
    )


def test_constant_of_shape_is_folded():
    b = NetBuilder((1, 3, 8, 8))
    shape = b._int64([1, 3, 8, 8])
    b.nodes.append(
        helper.make_node(
            "ConstantOfShape",
            [shape],
            ["bias"],
            name="cos",
            value=numpy_helper.from_array(np.array([0.5], np.float32)),
        )
    )
    model = b.build([b.conv(b.add(b.input, "bias"), 4)])
    loaded = onnxcut.load(model)
    assert "cos" not in {n.name for n in loaded.graph.node}
    bias = next(t for t in loaded.graph.initializer if t.name == "bias")
    np.testing.assert_array_equal(numpy_helper.to_array(bias), np.full((1, 3, 8, 8), 0.5))


def test_unnamed_nodes_get_unique_names():
    model = conv_bn_net()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[1].name = model.graph.node[0].name = "dup"
    names = [n.name for n in onnxcut.load(model).graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert names == [n.name for n in onnxcut.load(model).graph.node]  # deterministic


def test_ir3_initializers_listed_as_inputs():
    model = conv_bn_net(opset=9, ir_version=3)
    assert len(model.graph.input) == 1 + len(model.graph.initializer)
    loaded = onnxcut.load(model)
    assert [i.name for i in graph_inputs(loaded)] == ["input"]
    assert count_params(loaded) == count_params(onnxcut.load(conv_bn_net()))


def test_ir3_constants_are_declared_as_inputs():
    model = conv_bn_net(opset=9, ir_version=3, weights="constant")
    loaded = onnxcut.load(model)
    inits = {t.name for t in loaded.graph.initializer}
    assert inits <= {i.name for i in loaded.graph.input}
    onnx.checker.check_model(loaded)


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_opsets(opset: int):
    model = conv_bn_net(opset=opset)
    loaded = onnxcut.load(model)
    feeds = _feed(model)
    out = model.graph.output[0].name
    np.testing.assert_array_equal(run(model, feeds)[out], run(loaded, feeds)[out])


def test_opset_too_old_is_refused():
    model = conv_bn_net(opset=9)
    model.opset_import[0].version = 6
    with pytest.raises(ModelError, match=r"opset 6.*convert_version"):
        onnxcut.load(model)


def test_dynamic_shape_fixed_by_input_shape():
    model = conv_bn_net()
    dim = model.graph.input[0].type.tensor_type.shape.dim
    dim[0].dim_param, dim[2].dim_param, dim[3].dim_param = "N", "H", "W"
    expected = r"'input' has dynamic shape Nx3xHxW; .* input:1x3xSIZExSIZE"
    with pytest.raises(ModelError, match=expected):
        require_static(onnxcut.load(model))
    fixed = onnxcut.load(model, {"input": [2, 3, 32, 32]})
    require_static(fixed)
    assert dims(fixed.graph.output[0]) == [2, 10]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["input"], "expected NAME:DxDx"),
        (["input:1x3xa"], "expected"),
        (["input:0x3x8x8"], "expected"),
        (["image:1x3x8x8"], "not a model input; inputs: input"),
        (["input:1x3x8"], "rank 3 given"),
        (["input:1x4x16x16"], "dim 1 is fixed at 3"),
    ],
)
def test_bad_input_shape(spec, message):
    with pytest.raises(ModelError, match=message):
        onnxcut.load(conv_bn_net(), parse_input_shapes(spec))


def test_nhwc_transpose_after_input():
    b = NetBuilder((1, 3, 16, 16), layout="nhwc")
    model = b.build([b.gemm(b.flatten(b.gap(b.relu(b.conv(b.input, 8)))), 5)])
    loaded = onnxcut.load(model)
    assert dims(graph_inputs(loaded)[0]) == [1, 16, 16, 3]
    assert loaded.graph.node[0].op_type == "Transpose"


def _save_external(model: onnx.ModelProto, folder: Path, location: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save moves the data out of the proto it is given
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_external_data_loads(tmp_path: Path):
    model = conv_bn_net()
    path = _save_external(model, tmp_path, "weights.bin")
    assert (tmp_path / "weights.bin").exists()
    loaded = onnxcut.load(path)
    assert count_params(loaded) == count_params(onnxcut.load(model))
    feeds = _feed(model)
    out = model.graph.output[0].name
    np.testing.assert_array_equal(run(model, feeds)[out], run(loaded, feeds)[out])


def test_external_data_escaping_folder_is_refused(tmp_path: Path):
    path = _save_external(conv_bn_net(), tmp_path / "m", "weights.bin")
    os.replace(tmp_path / "m" / "weights.bin", tmp_path / "weights.bin")
    proto = onnx.load(path, load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(proto, path)
    with pytest.raises(ModelError, match=r"'\.\./weights\.bin' outside the model folder"):
        onnxcut.load(path)


def test_external_data_missing_file(tmp_path: Path):
    path = _save_external(conv_bn_net(), tmp_path, "weights.bin")
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ModelError, match=r"'weights\.bin', which is missing"):
        onnxcut.load(path)


@pytest.mark.slow
def test_external_data_over_2gb(tmp_path: Path):
    """A 2.4 GB model loads, is inspected without serialising, and saves back."""
    n, parts = 200_000_000, 3
    with open(tmp_path / "big.data", "wb") as f:  # written in blocks: no 2.4 GB array
        for i in range(parts):
            block = np.full(n // 10, i, np.float32).tobytes()
            for _ in range(10):
                f.write(block)
    inits = []
    for i in range(parts):
        t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[n])
        for key, value in (("location", "big.data"), ("offset", i * 4 * n), ("length", 4 * n)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        t.data_location = TensorProto.EXTERNAL
        inits.append(t)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])
    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"]) for i in range(parts)]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [n]) for i in range(parts)]
    graph = helper.make_graph(nodes, "big", [x], outs, inits)
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "big.onnx"
    )
    loaded = onnxcut.load(tmp_path / "big.onnx")
    assert count_params(loaded) == parts * n
    assert numpy_helper.to_array(loaded.graph.initializer[2])[-1] == 2
    out = onnxcut.save(loaded, tmp_path / "copy.onnx")
    del loaded
    assert (tmp_path / "copy.onnx.data").stat().st_size == parts * 4 * n
    assert count_params(onnx.load(out, load_external_data=False)) == parts * n


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "empty file"),
        (b"hello, this is text\n", "not an ONNX model"),
        ("truncated", "not an ONNX model"),
        (b"\x08\x07", "holds no ONNX graph"),
    ],
)
def test_bad_files(tmp_path: Path, content, message):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        content = conv_bn_net().SerializeToString()[:200]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as err:
        onnxcut.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_folder_is_not_a_model(tmp_path: Path):
    with pytest.raises(ModelError, match="not a file"):
        onnxcut.load(tmp_path)


def test_save_is_atomic_and_refuses_bad_targets(tmp_path: Path, conv_bn: Path):
    model = onnxcut.load(conv_bn)
    out = onnxcut.save(model, tmp_path / "out.onnx", source=str(conv_bn))
    assert onnx.load(out).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv_bn.onnx", "out.onnx"]
    with pytest.raises(OutputError, match="output is the input"):
        onnxcut.save(model, conv_bn, source=str(conv_bn))
    with pytest.raises(OutputError, match="does not exist"):
        onnxcut.save(model, tmp_path / "nope" / "x.onnx")
    with pytest.raises(OutputError, match="is a folder"):
        onnxcut.save(model, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_save_to_readonly_folder(tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputError, match="not writable"):
        onnxcut.save(conv_bn_net(), folder / "x.onnx")


@pytest.mark.parametrize(
    ("attrs", "why"),
    [
        ({"group": 0}, "group [0] has a value below 1"),
        ({"pads": [1, 1, 1]}, "pads has 3 values for a 2-D window (needs 4)"),
        ({"strides": [0, 1]}, "strides [0, 1] has a value below 1"),
    ],
)
def test_corrupt_window_attributes_are_refused(attrs, why, tmp_path):
    """Bit flips that still parse (a Conv group of 0, a pads list of the wrong length) stop
    at load with one line, not inside onnxruntime or a gradient rule."""
    from netbuilder import NetBuilder

    b = NetBuilder((1, 3, 8, 8))
    model = b.build([b.conv(b.input, 4)])
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    for name, value in attrs.items():
        kept = [a for a in conv.attribute if a.name != name]
        del conv.attribute[:]
        conv.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelError, match=rf"node '{conv.name}' \(Conv\): {re.escape(why)}"):
        onnxcut.load(path)
