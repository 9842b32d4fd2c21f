"""Blocked-layout (NCHWc) convolutions for a training graph on onnxruntime's CPU provider.

onnxruntime runs a Conv with its fastest CPU kernels (channels in blocks of 8 or 16, weights
reordered once into that layout) only when the weight is a constant: its NCHWc graph
transformer rewrites those Convs and leaves the others to an im2col and a GEMM per image.
In a training graph every trained weight is an input, so the forward convolutions and the
input-gradient convolutions all took the slow path. This pass spells the rewrite out with
the same contrib ops, the weight reorder becoming a few cheap ops on the (small) weight
each step:
    y = ReorderOutput(nchwc.Conv(ReorderInput(x), reorder(W), pad(B)), channels=M)
and an input gradient at stride 1 (ConvTranspose(dy, W)) becomes the same blocked Conv of
dy with W flipped and transposed. The block size comes from onnxruntime itself (`block`):
where its transformer does not run (another CPU family, another provider), nothing changes.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, helper, numpy_helper

from onnxcut.graph.io import GraphIndex, copy_model
from onnxcut.graph.shapes import infer_shapes
from onnxcut.runtime import onnxruntime
from onnxcut.train.builder import Builder

DOMAIN = "com.microsoft.nchwc"
INT64_MIN = -(2**63)
# Rewrite only Convs with at least this many output positions (batch x height x width): the
# weight reorder costs about as much as the blocked kernel saves on a few hundred positions
# (ResNet-18 at batch 8: rewriting its 7x7 layers too, 392 positions, took a step from
# 510-517 to 527-546 ms; its 14x14 layers, 1,568 positions, gain).
MIN_POSITIONS = 1024


@functools.cache
def block() -> int | None:
    """The channel block onnxruntime's NCHWc kernels use on this CPU, or None without them.

    Asked of onnxruntime: a Conv with one output channel and a constant weight comes back
    from its optimiser with that weight padded to one block of output channels.
    """
    ort = onnxruntime()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "probe",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 24, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [numpy_helper.from_array(np.ones((1, 24, 3, 3), np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with tempfile.TemporaryDirectory(prefix="onnxcut-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "probe.onnx")
        try:
            cpu = ["CPUExecutionProvider"]
            ort.InferenceSession(model.SerializeToString(), opts, providers=cpu)
            optimized = onnx.load(opts.optimized_model_filepath)
        except Exception:  # no CPU provider, or the file not written: keep the plain graph
            return None
    if not any(n.domain == DOMAIN for n in optimized.graph.node):
        return None
    dims = [t.dims[0] for t in optimized.graph.initializer if len(t.dims) == 4]
    return int(dims[0]) if dims and dims[0] > 1 else None


def blocked(model: ModelProto, size: int | None = None) -> ModelProto:
    """A copy of `model` whose dense 2-D Convs with a weight that is not a constant, and
    stride-1 ConvTransposes of input gradients, are blocked Convs; `model` is not changed
    (and is what comes back where this CPU has no blocked kernels)."""
    size = size or block()
    if size is None:
        return model
    model = infer_shapes(copy_model(model))  # the training graph keeps no value_info
    ctx = _Context(Builder("nchwc"), GraphIndex(model), size)
    out: list[NodeProto] = []
    changed = False
    for node in model.graph.node:
        rule = _RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None or not rule(ctx, node):
            out.append(node)
            continue
        out.extend(ctx.b.nodes)
        ctx.b.nodes.clear()
        changed = True
    if not changed:
        return model
    del model.graph.node[:]
    model.graph.node.extend(out)
    model.graph.initializer.extend(ctx.b.inits)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


@dataclass
class _Context:
    b: Builder
    index: GraphIndex  # the graph before the rewrite, shapes inferred
    size: int  # the channel block
    reordered: dict[str, str] = field(default_factory=dict)  # tensor -> its blocked copy

    def blocked_input(self, x: str) -> str:
        """One ReorderInput per tensor, however many rewritten Convs read it (the ASPP
        branches of DeepLab read one)."""
        if x not in self.reordered:
            xb = self.b.name("ReorderInput")
            self.b.nodes.append(helper.make_node("ReorderInput", [x], [xb], domain=DOMAIN, name=xb))
            self.reordered[x] = xb
        return self.reordered[x]


def _attrs(node: NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dense_2d(index: GraphIndex, node: NodeProto, attrs: dict) -> list[int] | None:
    """The weight's static 4-D shape when it is a trained (non-constant) dense 2-D kernel
    and the output has enough positions to pay for reordering it."""
    w = node.input[1]
    if index.const(w) is not None or int(attrs.get("group", 1)) != 1:
        return None
    if any(index.dtype(t) != onnx.TensorProto.FLOAT for t in (node.input[0], w)):
        return None  # the blocked kernels are float32 only
    out = index.shape(node.output[0])
    if out is None or len(out) != 4 or not all(isinstance(d, int) and d > 0 for d in out):
        return None
    if out[0] * out[2] * out[3] < MIN_POSITIONS:
        return None
    shape = index.shape(w)
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        return None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return list(shape)


def _conv(ctx: _Context, node: NodeProto) -> bool:
    b, size = ctx.b, ctx.size
    attrs = _attrs(node)
    shape = _dense_2d(ctx.index, node, attrs)
    if shape is None or not _blockable(shape[1], size):
        return False
    weight = _reorder(b, node.input[1], shape, size)
    bias = _pad_bias(b, node, shape[0], size)
    kept = {k: attrs[k] for k in ("pads", "strides", "dilations") if k in attrs}
    _emit(ctx, node, weight, bias, shape, kept)
    return True


def _conv_transpose(ctx: _Context, node: NodeProto) -> bool:
    """ConvTranspose(dy, W) at stride 1 = Conv(dy, W flipped, channels swapped), pads
    (k - 1) d - p on each side."""
    b, size = ctx.b, ctx.size
    attrs = _attrs(node)
    shape = _dense_2d(ctx.index, node, attrs)
    if shape is None or any(s != 1 for s in attrs.get("strides", [1, 1])):
        return False
    if any(attrs.get("output_padding", [0, 0])) or "output_shape" in attrs:
        return False
    m, c, kh, kw = shape
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    extents = [(kh - 1) * dilations[0], (kw - 1) * dilations[1]]
    conv_pads = [e - p for e, p in zip(extents * 2, pads, strict=True)]
    if min(conv_pads) < 0 or not _blockable(m, size):
        return False
    swapped = b.op("Transpose", [node.input[1]], perm=[1, 0, 2, 3])
    back = b.ints([-1, -1])
    flipped = b.op("Slice", [swapped, back, b.ints([INT64_MIN] * 2), b.ints([2, 3]), back])
    conv_shape = [c, m, kh, kw]
    weight = _reorder(b, flipped, conv_shape, size)
    bias = _pad_bias(b, node, c, size)
    _emit(ctx, node, weight, bias, conv_shape, {"pads": conv_pads, "dilations": dilations})
    return True


def _blockable(channels: int, size: int) -> bool:
    """ReorderInput takes channel counts that are multiples of 4; below one block (a stem on
    three colour channels) the padding would be wasted work."""
    return channels >= size and channels % 4 == 0


def _up(n: int, size: int) -> int:
    return -(-n // size) * size


def _reorder(b: Builder, w: str, shape: list[int], size: int) -> str:
    """(M, C, kh, kw) -> padded to blocks -> (M/b, C/b, kh, kw, b_in, b_out), flattened back
    to (M', C', kh, kw): the layout onnxruntime's reorder of a constant weight produces."""
    m, c, kh, kw = shape
    mp, cp = _up(m, size), _up(c, size)
    if (mp, cp) != (m, c):
        w = b.op("Pad", [w, b.ints([0, 0, 0, 0, mp - m, cp - c, 0, 0])])
    # Two 3- and 4-D transposes: onnxruntime's one 6-D transpose (perm 0 2 4 5 3 1) took
    # 2.5x as long on a 512x512x3x3 weight.
    w = b.op("Reshape", [w, b.ints([mp // size, size, cp * kh * kw])])
    w = b.op("Transpose", [w], perm=[0, 2, 1])  # (M/b, C, kh, kw, b_out)
    w = b.op("Reshape", [w, b.ints([mp // size * cp // size, size, kh * kw, size])])
    w = b.op("Transpose", [w], perm=[0, 2, 1, 3])  # (M/b, C/b, kh kw, b_in, b_out)
    return b.op("Reshape", [w, b.ints([mp, cp, kh, kw])])


def _pad_bias(b: Builder, node: NodeProto, m: int, size: int) -> str | None:
    bias = node.input[2] if len(node.input) > 2 else ""
    if not bias:
        return None
    mp = _up(m, size)
    return bias if mp == m else b.op("Pad", [bias, b.ints([0, mp - m])])


def _emit(ctx: _Context, node: NodeProto, weight: str, bias: str | None, shape, attrs) -> None:
    """The blocked Conv of the input's blocked copy, reordered back to the node's output."""
    b = ctx.b
    xb = ctx.blocked_input(node.input[0])
    yb = b.name("Conv")
    inputs = [xb, weight, *([bias] if bias else [])]
    kernel = {"kernel_shape": shape[2:]}
    b.nodes.append(
        helper.make_node("Conv", inputs, [yb], domain=DOMAIN, name=node.name, **kernel, **attrs)
    )
    b.nodes.append(
        helper.make_node(
            "ReorderOutput", [yb], [node.output[0]], domain=DOMAIN, channels=shape[0],
            name=b.name("ReorderOutput"),
        )
    )  # fmt: skip


_RULES = {"Conv": _conv, "ConvTranspose": _conv_transpose}
