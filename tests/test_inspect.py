"""inspect: parameter counts, FLOPs and layer tables, checked against hand counts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxcut
from onnxcut.channels.inspection import count_params, layers, require_layers, summarize
from onnxcut.errors import ModelError

from conftest import SAMPLE_NAMES, conv_bn_net, sample_model
from netbuilder import NetBuilder


def _mixed_net(**builder_args) -> onnx.ModelProto:
    b = NetBuilder((1, 3, 16, 16), **builder_args)
    x = b.relu(b.conv(b.input, 8))  # 8*3*9 + 8
    x = b.conv(x, 8, group=8, stride=2)  # depthwise: 8*1*9 + 8, out 8x8
    x = b.conv_transpose(x, 4)  # 8*4*2*2 + 4, out 16x16
    x = b.matmul(b.flatten(b.gap(x)), 6)  # 4*6
    return b.build([b.gemm(x, 10)])  # 10*6 + 10


EXPECTED_PARAMS = (8 * 27 + 8) + (72 + 8) + (128 + 4) + 24 + 70
EXPECTED_LAYERS = [
    ("Conv", 3, 8, [3, 3], 1, 8 * 16 * 16 * 27),
    ("Conv", 8, 8, [3, 3], 8, 8 * 8 * 8 * 9),
    ("ConvTranspose", 8, 4, [2, 2], 1, 8 * 8 * 8 * 4 * 4),
    ("MatMul", 4, 6, [], 1, 24),
    ("Gemm", 6, 10, [], 1, 60),
]


@pytest.mark.parametrize("weights", ["initializer", "constant"])
def test_counts_match_hand_counts(weights: str):
    model = onnxcut.load(_mixed_net(weights=weights))
    assert count_params(model) == EXPECTED_PARAMS
    got = [
        (r["op"], r["in_channels"], r["out_channels"], r["kernel"], r["groups"], r["flops"])
        for r in layers(model)
    ]
    assert got == EXPECTED_LAYERS
    assert summarize(model)["flops"] == sum(row[-1] for row in EXPECTED_LAYERS)


def test_tflite_style_nhwc_export():
    """NHWC input with Transpose and a channel Pad widening a residual, as TFLite gives."""
    b = NetBuilder((1, 3, 16, 16), layout="nhwc")
    x = b.relu(b.conv(b.input, 8))
    y = b.relu(b.conv(x, 12, stride=2))
    widened = b.pad(b.maxpool(x), [0, 0, 0, 0, 0, 4, 0, 0])  # 8 -> 12 channels
    model = onnxcut.load(b.build([b.gemm(b.flatten(b.gap(b.add(y, widened))), 10)]))
    report = summarize(model)
    assert report["inputs"] == [{"name": "input", "shape": [1, 16, 16, 3]}]
    assert [(r["in_channels"], r["out_channels"]) for r in report["layers"]] == [
        (3, 8),
        (8, 12),
        (12, 10),
    ]
    assert report["params"] == (8 * 27 + 8) + (12 * 72 + 12) + (10 * 12 + 10)


def test_paddle_style_export():
    """Constant-node weights and hard-swish spelled as Add/Clip/Mul/Div, as Paddle gives."""
    b = NetBuilder((1, 3, 16, 16), weights="constant")
    x = b.hardswish_spelled(b.bn(b.conv(b.input, 8, bias=False)))
    model = onnxcut.load(b.build([b.gemm(b.flatten(b.gap(x)), 10)]))
    # The scalar constants of the spelled hard-swish are weights too: 0, 6, 3, 6.
    assert count_params(model) == 8 * 27 + 4 * 8 + 4 + 10 * 8 + 10


def test_unknown_spatial_size_gives_unknown_flops():
    model = conv_bn_net()
    dim = model.graph.input[0].type.tensor_type.shape.dim
    dim[2].dim_param = "H"
    report = summarize(onnxcut.load(model))
    assert report["flops"] is None
    assert report["params"] == count_params(onnxcut.load(conv_bn_net()))


def test_model_without_layers_is_refused():
    b = NetBuilder((1, 3, 8, 8))
    model = b.build([b.relu(b.input)])
    with pytest.raises(ModelError, match="no Conv, ConvTranspose, Gemm or MatMul layer"):
        require_layers(model, "relu.onnx")


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_models(name: str):
    model = onnxcut.load(sample_model(name))
    report = summarize(model)
    torch_style = sum(
        int(np.prod(t.dims))
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )
    assert report["params"] == torch_style > 0
    assert report["layers"] and all(
        r["in_channels"] and r["out_channels"] for r in report["layers"]
    )
    json.dumps(report)  # serialisable as the CLI prints it


def test_flops_behind_shape_arithmetic():
    """Conv input sizes that come from Shape arithmetic (x.chunk) still give FLOPs."""
    from test_grad import chunked

    model, _, _ = chunked()
    report = summarize(onnxcut.load(model))
    # 6x8x8 outputs of 3x3x3, 3x4x4 of 3x3x3, 1100x8x8 of 6x1x1, and 4 of 1100.
    assert report["flops"] == 384 * 27 + 48 * 27 + 70400 * 6 + 4 * 1100
