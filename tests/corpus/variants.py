"""The corpus: small CNNs spelled the ways real exporters spell them, built in code.

Each variant is one segmentation net (N x K x H x W logits) or one classifier (N x K), built
by NetBuilder and then rewritten the way an exporter would write it: IR 3 to 10, opsets 9 to
21, initializers listed as inputs, weights in Constant or ConstantOfShape nodes, biases
through Reshape, BatchNorm as Mul/Add, value_info without shapes, NHWC with Transposes, a
channel Pad, a dynamic batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from netbuilder import NetBuilder

SIZE = 16  # input height and width
CATEGORIES = 4  # background plus three


@dataclass(frozen=True)
class Spelling:
    """How one variant writes the shared architecture."""

    opset: int = 17
    ir: int = 8
    weights: str = "initializer"  # or "constant": Constant nodes (PaddlePaddle)
    layout: str = "nchw"  # "nhwc": NHWC input and Transposes around the body (TFLite)
    bias: str = "conv"  # "reshape": Add(x, Reshape(b)); "constantofshape": b from a node
    bn: str = "node"  # "spelled": Mul/Add of reshaped constants
    pad: bool = False  # widen a residual with a Pad on the channel axis
    dynamic_batch: bool = False
    inits_as_inputs: bool = False  # list initializers as graph inputs (IR 3 must)
    shapeless: bool = False  # value_info, output and initializer inputs without shapes


@dataclass(frozen=True)
class Variant:
    name: str
    task: str  # "segment" or "classify"
    spelling: Spelling = field(default_factory=Spelling)
    # flags attribute and eval need for this export (an NHWC head's category axis)
    head_args: tuple[str, ...] = ()

    def build(self) -> onnx.ModelProto:
        return build(self.task, self.spelling)


def build(task: str, s: Spelling) -> onnx.ModelProto:
    """Return the model for one task and spelling (ONNX-checked unless shape-less)."""
    b = NetBuilder(
        (1, 3, SIZE, SIZE),
        opset=s.opset,
        ir_version=s.ir,
        seed=s.opset * 7 + s.ir,
        weights=s.weights,
        layout=s.layout,
    )
    x = _block(b, s, b.input, 8)
    if s.pad:
        # 8 -> 12 channels: a TFLite conversion widens a residual with a channel Pad.
        y = _block(b, s, x, 12, stride=2)
        wide = b.pad(b.maxpool(x), [0, 0, 0, 0, 0, 4, 0, 0])
        y = b.add(y, wide)
    else:
        y = _block(b, s, x, 8, stride=2)
        y = b.add(y, b.relu(_conv(b, s, y, 8)))
    if s.layout == "nhwc":
        # The body of a TFLite conversion hops in and out of NHWC around its ops.
        y = b.transpose(b.relu(b.transpose(y, [0, 2, 3, 1])), [0, 3, 1, 2])
    if task == "segment":
        up = b.relu(b.conv_transpose(y, 8))
        logits = b.conv(b.add(up, x), CATEGORIES, 1)
        if s.layout == "nhwc":
            logits = b.transpose(logits, [0, 2, 3, 1])
    else:
        pooled = b.flatten(b.gap(b.relu(_conv(b, s, y, 8))))
        logits = b.gemm(pooled, CATEGORIES)
    model = b.build([logits], dynamic_batch=s.dynamic_batch)
    if s.inits_as_inputs or s.ir < 4:
        _declare_initializers(model, shaped=not s.shapeless)
    if s.shapeless:
        _drop_shapes(model)  # the checker wants shapes; onnxruntime and exporters do not
    else:
        onnx.checker.check_model(model)
    return model


def _conv(b: NetBuilder, s: Spelling, x: str, cout: int, stride: int = 1) -> str:
    if s.bias == "conv":
        return b.conv(x, cout, stride=stride)
    y = b.conv(x, cout, stride=stride, bias=False)
    if s.bias == "reshape":
        return b.reshaped_bias(y)
    return _constant_of_shape_bias(b, y)


def _block(b: NetBuilder, s: Spelling, x: str, cout: int, stride: int = 1) -> str:
    y = _conv(b, s, x, cout, stride)
    return b.relu(b.bn_spelled(y) if s.bn == "spelled" else b.bn(y))


def _constant_of_shape_bias(b: NetBuilder, x: str) -> str:
    """x + ConstantOfShape([1, C, 1, 1], 0.05): an exporter's constant bias or shift."""
    c = b.channels(x)
    value = numpy_helper.from_array(np.array([0.05], np.float32), "value")
    bias = b._node("ConstantOfShape", [b._int64([1, c, 1, 1])], value=value)
    return b.add(x, bias)


def _declare_initializers(model: onnx.ModelProto, shaped: bool) -> None:
    listed = {v.name for v in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims) if shaped else None)
        for t in model.graph.initializer
        if t.name not in listed
    )


def _drop_shapes(model: onnx.ModelProto) -> None:
    """Declare every node output in value_info without a shape, and the output shape-less."""
    model.graph.value_info.extend(
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
        for n in model.graph.node
        for o in n.output
        if o not in {v.name for v in model.graph.output}
    )
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")


# IR version -> the opsets it is paired with here; together they cover IR 3..10, opset 9..21.
_IR_OPSETS = {
    3: (9,),
    4: (9,),
    5: (10,),
    6: (11,),
    7: (12, 13, 14),
    8: (15, 16, 17, 18),
    9: (19, 20),
    10: (21,),
}


def _versions() -> list[Variant]:
    out = []
    for ir, opsets in _IR_OPSETS.items():
        for opset in opsets:
            task = "segment" if (ir + opset) % 2 else "classify"
            out.append(Variant(f"ir{ir}-opset{opset}", task, Spelling(opset=opset, ir=ir)))
    return out


_SPELLINGS: dict[str, Spelling] = {
    "init-inputs": Spelling(opset=13, ir=7, inits_as_inputs=True),
    "constant-weights": Spelling(opset=11, ir=6, weights="constant"),
    "constantofshape": Spelling(bias="constantofshape"),
    "reshaped-bias": Spelling(bias="reshape"),
    "bn-mul-add": Spelling(bn="spelled"),
    "shapeless": Spelling(opset=11, ir=7, inits_as_inputs=True, shapeless=True),
    "nhwc": Spelling(layout="nhwc"),
    "channel-pad": Spelling(pad=True),
    "dynamic-batch": Spelling(dynamic_batch=True),
    "paddle": Spelling(
        opset=11, ir=7, weights="constant", bias="reshape", inits_as_inputs=True, shapeless=True
    ),
    "tflite": Spelling(opset=13, ir=7, layout="nhwc", bn="spelled", pad=True, dynamic_batch=True),
}


def _spellings() -> list[Variant]:
    out = []
    for name, spelling in _SPELLINGS.items():
        for task in ("segment", "classify"):
            nhwc_head = task == "segment" and spelling.layout == "nhwc"
            args = ("--category-axis", "3") if nhwc_head else ()
            out.append(Variant(f"{name}/{task[:3]}", task, spelling, args))
    return out


VARIANTS: dict[str, Variant] = {v.name: v for v in [*_versions(), *_spellings()]}
# The CI sample: one of each task, the oldest IR, weights in nodes, NHWC with a channel Pad.
QUICK = ("ir3-opset9", "ir10-opset21", "paddle/seg", "tflite/cla")
