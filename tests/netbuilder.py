"""Build small ONNX CNNs in code, for tests: every op mix an exporter produces.

    b = NetBuilder((1, 3, 16, 16))
    y = b.relu(b.bn(b.conv(b.input, 8)))
    model = b.build([b.gemm(b.flatten(b.gap(y)), 10)])

Weights are random but seeded. `weights="constant"` stores them in Constant nodes, as
PaddlePaddle exports do; `layout="nhwc"` adds the Transpose a TFLite conversion starts with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class NetBuilder:
    def __init__(
        self,
        shape: Sequence[int] = (1, 3, 16, 16),
        *,
        opset: int = 17,
        seed: int = 0,
        weights: str = "initializer",
        layout: str = "nchw",
        input_name: str = "input",
        ir_version: int | None = None,
    ):
        assert weights in ("initializer", "constant")
        assert layout in ("nchw", "nhwc")
        self.opset = opset
        self.ir_version = ir_version
        self.rng = np.random.default_rng(seed)
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0
        shape = list(shape)
        if layout == "nhwc":
            n, c, h, w = shape
            self.inputs = [
                helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [n, h, w, c])
            ]
            self.input = self._node("Transpose", [input_name], perm=[0, 3, 1, 2])
        else:
            self.inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)]
            self.input = input_name
        self.input_name = input_name

    # -- plumbing ---------------------------------------------------------------------------
    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def _node(
        self, op: str, inputs: Sequence[str], n_out: int = 1, name: str | None = None, **attrs
    ) -> str | list[str]:
        name = name or self._name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, array: np.ndarray, prefix: str = "w") -> str:
        """Add a constant (initializer or Constant node, per the builder's mode)."""
        name = self._name(prefix)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        if self.weights == "constant":
            self.nodes.append(
                helper.make_node("Constant", [], [name], name=f"{name}_const", value=tensor)
            )
        else:
            self.inits.append(tensor)
        return name

    def _int64(self, values: Sequence[int]) -> str:
        name = self._name("shape")
        self.inits.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def _rand(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return (self.rng.standard_normal(shape) * s).astype(np.float32)

    def shape(self, tensor: str) -> list[int]:
        """Infer a tensor's static shape from the graph built so far."""
        model = self._model([tensor], check=False)
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            if v.name == tensor and v.type.tensor_type.HasField("shape"):
                return [d.dim_value for d in v.type.tensor_type.shape.dim]
        raise AssertionError(f"no shape for {tensor}")

    def channels(self, tensor: str) -> int:
        return self.shape(tensor)[1]

    def _model(self, outputs: Sequence[str], check: bool = True) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
        inputs = list(self.inputs)
        if self.ir_version is not None and self.ir_version < 4:
            # Before IR 4 every initializer is also declared as a graph input.
            inputs += [
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits
            ]
        graph = helper.make_graph(self.nodes, "net", inputs, outs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version or min(model.ir_version, 8)
        if check:
            inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
            for out, new in zip(model.graph.output, inferred.graph.output, strict=True):
                out.CopyFrom(new)
            onnx.checker.check_model(model)
        return model

    def build(self, outputs: Sequence[str], dynamic_batch: bool = False) -> onnx.ModelProto:
        """Return the checked model with the given outputs (batch dim symbolic if asked)."""
        model = self._model(outputs)
        if dynamic_batch:
            model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
            for out in model.graph.output:
                out.type.tensor_type.shape.dim[0].dim_param = "N"
        return model

    # -- parameter layers -------------------------------------------------------------------
    def conv(
        self,
        x: str,
        cout: int,
        k: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        group: int = 1,
        pads: Sequence[int] | None = None,
        bias: bool = True,
        auto_pad: str | None = None,
    ) -> str:
        cin = self.channels(x)
        w = self.const(self._rand(cout, cin // group, k, k), "conv_w")
        inputs = [x, w] + ([self.const(self._rand(cout, scale=0.1), "conv_b")] if bias else [])
        attrs = dict(
            kernel_shape=[k, k], strides=[stride, stride], dilations=[dilation] * 2, group=group
        )
        if auto_pad:
            attrs["auto_pad"] = auto_pad
        else:
            p = dilation * (k - 1) // 2
            attrs["pads"] = list(pads) if pads is not None else [p, p, p, p]
        return self._node("Conv", inputs, name=self._name("conv"), **attrs)

    def conv_transpose(
        self, x: str, cout: int, k: int = 2, *, stride: int = 2, group: int = 1, bias: bool = True
    ) -> str:
        cin = self.channels(x)
        w = self.const(self._rand(cin, cout // group, k, k), "deconv_w")
        inputs = [x, w] + ([self.const(self._rand(cout, scale=0.1), "deconv_b")] if bias else [])
        return self._node(
            "ConvTranspose", inputs, kernel_shape=[k, k], strides=[stride] * 2, group=group
        )

    def gemm(self, x: str, n: int, *, trans_b: bool = True) -> str:
        k = self.shape(x)[1]
        w = self._rand(n, k)
        wt = w if trans_b else np.ascontiguousarray(w.T)
        return self._node(
            "Gemm",
            [x, self.const(wt, "fc_w"), self.const(self._rand(n, scale=0.1), "fc_b")],
            transB=int(trans_b),
        )

    def matmul(self, x: str, n: int) -> str:
        k = self.shape(x)[-1]
        return self._node("MatMul", [x, self.const(self._rand(k, n), "mm_w")])

    def bn(self, x: str, eps: float = 1e-5) -> str:
        c = self.channels(x)
        r = self.rng
        params = [
            (r.uniform(0.5, 1.5, c)).astype(np.float32),
            (r.standard_normal(c) * 0.1).astype(np.float32),
            (r.standard_normal(c) * 0.1).astype(np.float32),
            r.uniform(0.5, 1.5, c).astype(np.float32),
        ]
        names = [
            self.const(p, n) for p, n in zip(params, ["bn_s", "bn_b", "bn_m", "bn_v"], strict=True)
        ]
        return self._node("BatchNormalization", [x, *names], epsilon=eps)

    # -- activations ------------------------------------------------------------------------
    def relu(self, x: str) -> str:
        return self._node("Relu", [x])

    def leaky_relu(self, x: str, alpha: float = 0.1) -> str:
        return self._node("LeakyRelu", [x], alpha=alpha)

    def prelu(self, x: str) -> str:
        c = self.channels(x)
        slope = self.const(self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32), "slope")
        return self._node("PRelu", [x, slope])

    def clip(self, x: str, lo: float = 0.0, hi: float = 6.0) -> str:
        return self._node(
            "Clip", [x, self.const(np.float32(lo), "lo"), self.const(np.float32(hi), "hi")]
        )

    def unary(self, op: str, x: str, **attrs) -> str:
        return self._node(op, [x], **attrs)

    def hardswish(self, x: str) -> str:
        return self._node("HardSwish", [x])

    def hardswish_spelled(self, x: str) -> str:
        """x * clip(x + 3, 0, 6) / 6, as PaddlePaddle exports it."""
        shifted = self._node("Add", [x, self.const(np.float32(3.0), "three")])
        return self._node(
            "Div", [self._node("Mul", [x, self.clip(shifted)]), self.const(np.float32(6.0), "six")]
        )

    # -- arithmetic and structure -----------------------------------------------------------
    def add(self, a: str, b: str) -> str:
        return self._node("Add", [a, b])

    def mul(self, a: str, b: str) -> str:
        return self._node("Mul", [a, b])

    def channel_const(self, op: str, x: str) -> str:
        """Op with a per-channel constant of shape (C, 1, 1)."""
        c = self.channels(x)
        value = self.rng.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)
        return self._node(op, [x, self.const(value, "chan")])

    def axis_const(self, op: str, x: str, axis: int = -1) -> str:
        """Op with a constant that varies along `axis` only (e.g. a MatMul bias on -1)."""
        shape = self.shape(x)
        axis = axis % len(shape)
        value = self.rng.uniform(0.5, 1.5, [shape[axis]] + [1] * (len(shape) - 1 - axis))
        return self._node(op, [x, self.const(value.astype(np.float32), "axis_c")])

    def scalar_const(self, op: str, x: str, value: float = 2.0) -> str:
        return self._node(op, [x, self.const(np.float32(value), "scalar")])

    def concat(self, xs: Sequence[str], axis: int = 1) -> str:
        return self._node("Concat", list(xs), axis=axis)

    def maxpool(
        self, x: str, k: int = 2, stride: int = 2, pads: Sequence[int] = (0, 0, 0, 0)
    ) -> str:
        return self._node(
            "MaxPool", [x], kernel_shape=[k, k], strides=[stride] * 2, pads=list(pads)
        )

    def avgpool(self, x: str, k: int = 2, stride: int = 2) -> str:
        return self._node("AveragePool", [x], kernel_shape=[k, k], strides=[stride] * 2)

    def gap(self, x: str) -> str:
        return self._node("GlobalAveragePool", [x])

    def flatten(self, x: str) -> str:
        return self._node("Flatten", [x], axis=1)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        return self._node("Reshape", [x, self._int64(shape)])

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        return self._node("Transpose", [x], perm=list(perm))

    def resize(self, x: str, scale: float = 2.0, mode: str = "nearest") -> str:
        scales = self.const(np.array([1, 1, scale, scale], np.float32), "scales")
        extra = {"coordinate_transformation_mode": "half_pixel"} if mode == "linear" else {}
        return self._node("Resize", [x, "", scales], mode=mode, **extra)

    def resize_to(self, x: str, size: Sequence[int], mode: str = "linear") -> str:
        n, c = self.shape(x)[:2]
        sizes = self._int64([n, c, *size])
        return self._node(
            "Resize", [x, "", "", sizes], mode=mode, coordinate_transformation_mode="half_pixel"
        )

    def pad(self, x: str, pads: Sequence[int], mode: str = "constant") -> str:
        return self._node("Pad", [x, self._int64(pads)], mode=mode)

    def split(self, x: str, sizes: Sequence[int], axis: int = 1) -> list[str]:
        return self._node("Split", [x, self._int64(sizes)], n_out=len(sizes), axis=axis)

    def slice(self, x: str, start: int, end: int, axis: int = 1) -> str:
        return self._node(
            "Slice", [x, self._int64([start]), self._int64([end]), self._int64([axis])]
        )

    def softmax(self, x: str, axis: int = 1) -> str:
        return self._node("Softmax", [x], axis=axis)

    def se(self, x: str, reduction: int = 4) -> str:
        """Squeeze-excitation: GAP -> conv -> relu -> conv -> HardSigmoid -> Mul."""
        c = self.channels(x)
        s = self.relu(self.conv(self.gap(x), max(c // reduction, 1), k=1))
        gate = self._node("HardSigmoid", [self.conv(s, c, k=1)], alpha=1 / 6, beta=0.5)
        return self.mul(x, gate)

    def instance_norm(self, x: str) -> str:
        c = self.channels(x)
        scale = self.const(self.rng.uniform(0.5, 1.5, c).astype(np.float32), "in_s")
        bias = self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "in_b")
        return self._node("InstanceNormalization", [x, scale, bias])

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: bool = True) -> str:
        if self.opset >= 18:
            return self._node("ReduceMean", [x, self._int64(axes)], keepdims=int(keepdims))
        return self._node("ReduceMean", [x], axes=list(axes), keepdims=int(keepdims))

    def view_flat(self, x: str) -> str:
        """x.view(x.size(0), -1) as the TorchScript exporter writes it: Shape arithmetic."""
        n = self._node("Gather", [self._node("Shape", [x]), self._int64([0])], axis=0)
        target = self._node("Concat", [n, self._int64([-1])], axis=0)
        return self._node("Reshape", [x, target])

    def channel_shuffle(self, x: str, groups: int) -> str:
        """ShuffleNet's Reshape -> Transpose -> Reshape over the channel axis."""
        n, c, h, w = self.shape(x)
        y = self.reshape(x, [n, groups, c // groups, h, w])
        return self.reshape(self.transpose(y, [0, 2, 1, 3, 4]), [n, c, h, w])

    # -- spellings of real exports ------------------------------------------------------------
    def reshaped_bias(self, x: str) -> str:
        """x + Reshape(bias, [1, C, 1, 1]): a conv bias as PaddlePaddle exports add it."""
        c = self.channels(x)
        bias = self.const((self.rng.standard_normal(c) * 0.1).astype(np.float32), "rbias")
        return self.add(x, self._node("Reshape", [bias, self._int64([1, c, 1, 1])]))

    def bn_spelled(self, x: str, eps: float = 1e-5) -> str:
        """BatchNorm as older exports write it: x * Reshape(gamma / sqrt(var + eps)) +
        Reshape(beta - mean * scale), every step a node on constants."""
        c = self.channels(x)
        r = self.rng
        gamma, var = (self.const(r.uniform(0.5, 1.5, c).astype(np.float32), n) for n in "gv")
        beta, mean = (self.const((r.standard_normal(c) * 0.1).astype(np.float32), n) for n in "bm")
        std = self._node("Sqrt", [self._node("Add", [var, self.const(np.float32(eps), "eps")])])
        scale = self._node("Div", [gamma, std])
        shift = self._node("Sub", [beta, self._node("Mul", [mean, scale])])
        shape = self._int64([1, c, 1, 1])
        y = self.mul(x, self._node("Reshape", [scale, shape]))
        return self.add(y, self._node("Reshape", [shift, shape]))

    def conv_fp16(self, x: str, cout: int, k: int = 3) -> str:
        """Conv whose weights are stored as float16 and Cast to float, as fp16 exports do."""
        w = self._rand(cout, self.channels(x), k, k).astype(np.float16)
        weights = self._node("Cast", [self.const(w, "w16")], to=TensorProto.FLOAT)
        p = (k - 1) // 2
        return self._node("Conv", [x, weights], kernel_shape=[k, k], pads=[p] * 4)

    def channel_shuffle_nhwc(self, x: str, groups: int) -> str:
        """The channel shuffle of a TFLite conversion, on an NHWC tensor."""
        n, h, w, c = self.shape(x)
        y = self.reshape(x, [n, h, w, groups, c // groups])
        return self.reshape(self.transpose(y, [0, 1, 2, 4, 3]), [n, h, w, c])
