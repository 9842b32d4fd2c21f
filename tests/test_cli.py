"""The CLI through click's CliRunner: output, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from onnxcut.cli.main import cli

from conftest import conv_bn_net
from netbuilder import NetBuilder


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_help_lists_verbs():
    result = invoke("--help")
    assert result.exit_code == 0
    assert "inspect" in result.output


def test_inspect_text(conv_bn: Path):
    result = invoke("inspect", conv_bn)
    assert result.exit_code == 0, result.output
    assert "opset 17" in result.output
    assert "params: 962 float weight elements" in result.output  # hand count below
    assert result.output.count(" Conv ") == 2 and " Gemm " in result.output


def test_inspect_json(conv_bn: Path):
    result = invoke("inspect", conv_bn, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {"opset", "ir_version", "inputs", "outputs", "params", "flops", "layers"} <= set(report)
    # conv 8*3*9+8, bn 4*8, conv 8*8*9+8, bn 4*8, gemm 10*8+10
    assert report["params"] == 224 + 32 + 584 + 32 + 90
    assert [layer["name"] for layer in report["layers"]] == [
        n.name for n in onnx.load(conv_bn).graph.node if n.op_type in ("Conv", "Gemm")
    ]
    assert {"name", "op", "in_channels", "out_channels", "groups", "flops"} <= set(
        report["layers"][0]
    )


def test_inspect_input_shape_flag(tmp_path: Path):
    model = conv_bn_net()
    for d, name in zip(model.graph.input[0].type.tensor_type.shape.dim, "NCHW", strict=True):
        if name != "C":
            d.dim_param = name
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    small = json.loads(invoke("inspect", path, "--json", "--input-shape", "input:1x3x16x16").output)
    big = json.loads(invoke("inspect", path, "--json", "--input-shape", "input:1x3x32x32").output)
    # Conv MACs grow with H*W; the Gemm's 10x8 do not.
    assert big["flops"] == 4 * small["flops"] - 3 * 80
    unknown = json.loads(invoke("inspect", path, "--json").output)
    assert unknown["flops"] is None


def test_inspect_assumes_batch_one(tmp_path: Path):
    b = NetBuilder((1, 3, 16, 16))
    path = tmp_path / "m.onnx"
    onnx.save(b.build([b.conv(b.input, 4)], dynamic_batch=True), path)
    result = invoke("inspect", path)
    assert result.exit_code == 0
    assert "assumed: batch 1" in result.output


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("name: not a model\n"), "not an ONNX model"),
        (lambda p: p.write_bytes(conv_bn_net().SerializeToString()[:300]), "not an ONNX model"),
    ],
)
def test_bad_model_is_one_line_exit_2(tmp_path: Path, make, message):
    path = tmp_path / "bad.onnx"
    make(path)
    result = invoke("inspect", path)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0]
    assert "Traceback" not in result.output


def test_bad_input_shape_flag(conv_bn: Path):
    result = invoke("inspect", conv_bn, "--input-shape", "images:1x3x8x8")
    assert result.exit_code == 2
    assert "'images', which is not a model input; inputs: input" in result.output


def test_bug_keeps_traceback(monkeypatch, conv_bn: Path):
    import onnxcut.channels.inspection

    def broken(model):
        raise KeyError("bug")

    monkeypatch.setattr(onnxcut.channels.inspection, "summarize", broken)
    result = invoke("inspect", conv_bn)
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


def test_commands_that_cut_need_a_layer(tmp_path: Path):
    b = NetBuilder((1, 3, 8, 8))
    path = tmp_path / "relu.onnx"
    onnx.save(b.build([b.relu(b.input)]), path)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "onnxcut.plan/1", "keep": {}}))
    result = invoke("extract", path, "--plan", plan, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 2
    assert "no Conv, ConvTranspose, Gemm or MatMul layer" in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_missing_runtime_names_the_extra(monkeypatch, conv_bn: Path, tmp_path: Path):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    (tmp_path / "x.png").write_bytes(b"")
    result = invoke("eval", conv_bn, "--data", tmp_path)
    assert result.exit_code == 2
    assert "pip install 'onnxcut[cpu]'" in result.output and "Traceback" not in result.output
