"""Gradient engine: every VJP rule, and whole networks, against central finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcut.errors import (
    BatchError,
    DataError,
    ModelError,
    OnnxcutError,
    UnsupportedOpError,
)
from onnxcut.grad import VJP_RULES, backward, prepare
from onnxcut.grad.registry import vjp
from onnxcut.graph.io import expose_tensors, load
from onnxcut.runtime import session

from conftest import SAMPLE_MODELS, SAMPLE_NAMES
from netbuilder import NetBuilder

EPS = 1e-2


def grid(*shape: int, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Distinct values 0.1 apart and 0.05 off every multiple of 0.1, so no kink or tie
    (Relu at 0, Clip at 6, HardSwish at +-3, MaxPool ties) lies within EPS of an input."""
    n = int(np.prod(shape))
    values = (np.arange(n) - n // 2 + 0.5) * 0.1 + offset
    return np.random.default_rng(seed).permutation(values).reshape(shape).astype(np.float32)


def rand(*shape: int, seed: int = 1, scale: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@dataclass
class Case:
    """A one-node model: `feeds` are differentiated graph inputs, `consts` initializers."""

    op: str
    feeds: dict[str, np.ndarray]
    inputs: list[str]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_out: int = 1
    output: int = 0
    name: str = ""
    params: tuple[str, ...] = ()  # feeds that are weights: no batch axis

    def __post_init__(self):
        self.name = self.name or self.op

    def model(self) -> onnx.ModelProto:
        outs = [f"y{i}" for i in range(self.n_out)]
        node = helper.make_node(self.op, self.inputs, outs, name="node", **self.attrs)
        graph = helper.make_graph(
            [node],
            "case",
            [
                helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
                for k, v in self.feeds.items()
            ],
            [helper.make_tensor_value_info(outs[self.output], TensorProto.FLOAT, None)],
            [numpy_helper.from_array(v, k) for k, v in self.consts.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        return model


def c(op, x, *extra, consts=None, feeds=None, name="", **kw) -> Case:
    """Case with input 'x' (a graph input) followed by `extra` input names."""
    return Case(op, {"x": x, **(feeds or {})}, ["x", *extra], consts or {}, name=name, **kw)


W = {"w": rand(4, 2, 3, 3), "b": rand(4)}
CASES: dict[str, list[Case]] = {
    "Relu": [c("Relu", grid(1, 2, 4, 4))],
    "LeakyRelu": [c("LeakyRelu", grid(1, 2, 4, 4), attrs={"alpha": 0.2})],
    "PRelu": [c("PRelu", grid(1, 2, 3, 3), "s", consts={"s": rand(2, 1, 1) + 1})],
    "Sigmoid": [c("Sigmoid", grid(1, 2, 3, 3))],
    "Tanh": [c("Tanh", grid(1, 2, 3, 3))],
    "Erf": [c("Erf", grid(1, 2, 3, 3))],
    "HardSigmoid": [c("HardSigmoid", grid(1, 2, 6, 6), attrs={"alpha": 1 / 6, "beta": 0.5})],
    "HardSwish": [c("HardSwish", grid(1, 2, 6, 6))],
    "Clip": [
        c(
            "Clip",
            grid(1, 2, 6, 6),
            "lo",
            "hi",
            consts={"lo": np.float32(-1.0), "hi": np.float32(2.0)},
        ),
        c("Clip", grid(1, 2, 3, 3), "", "hi", consts={"hi": np.float32(0.5)}, name="max-only"),
        c("Clip", grid(1, 2, 3, 3), attrs={"min": -0.5, "max": 0.5}, opset=9, name="attrs"),
    ],
    "Softmax": [
        c("Softmax", grid(1, 5, 2, 2), attrs={"axis": 1}),
        c("Softmax", grid(2, 6), name="last"),
    ],
    "LogSoftmax": [c("LogSoftmax", grid(1, 5, 2, 2), attrs={"axis": 1})],
    "Add": [c("Add", grid(1, 2, 3, 3), "z", feeds={"z": grid(1, 2, 1, 1, seed=2)})],
    "Sub": [c("Sub", grid(1, 2, 3, 3), "z", feeds={"z": grid(2, 1, 3, seed=2)})],
    # Offsets keep the inputs' values apart: Max and Min have a kink where two are equal.
    "Sum": [
        c(
            "Sum",
            grid(1, 2, 3, 3),
            "z",
            "u",
            feeds={"z": grid(1, 2, 1, 1, seed=2, offset=0.03), "u": grid(1, 1, 1, 3, offset=0.07)},
        )
    ],
    "Mean": [c("Mean", grid(1, 2, 3, 3), "z", feeds={"z": grid(1, 1, 3, 3, offset=0.03)})],
    "Max": [
        c(
            "Max",
            grid(1, 2, 3, 3),
            "z",
            "u",
            feeds={"z": grid(1, 2, 1, 1, seed=2, offset=0.03), "u": grid(1, 1, 1, 3, offset=0.07)},
        ),
        c("Max", grid(1, 2, 3, 3), "k", consts={"k": rand(2, 1, 1)}, name="const"),
    ],
    "Min": [c("Min", grid(1, 2, 3, 3), "z", feeds={"z": grid(1, 1, 3, 3, offset=0.03)})],
    "Mul": [
        c("Mul", grid(1, 2, 3, 3), "z", feeds={"z": grid(1, 2, 1, 1, seed=2)}),
        c("Mul", grid(1, 2, 3, 3), "k", consts={"k": rand(2, 1, 1)}, name="const"),
    ],
    "Div": [c("Div", grid(1, 2, 3, 3), "z", feeds={"z": np.abs(grid(1, 2, 1, 3, seed=2)) + 1})],
    "Pow": [
        c("Pow", grid(1, 2, 3, 3), "e", consts={"e": np.float32(3.0)}),
        c("Pow", np.abs(grid(1, 2, 3, 3)) + 0.5, "e", consts={"e": np.float32(-0.5)}, name="root"),
    ],
    "Sqrt": [c("Sqrt", np.abs(grid(1, 2, 3, 3)) + 0.5)],
    "Where": [c("Where", grid(1, 2, 3, 3), feeds={"z": grid(1, 1, 3, 3, seed=3)}, name="Where")],
    "Cast": [c("Cast", grid(1, 2, 3, 3), attrs={"to": TensorProto.FLOAT})],
    "Identity": [c("Identity", grid(1, 2, 3, 3))],
    "Dropout": [c("Dropout", grid(1, 2, 3, 3), n_out=2)],
    "Conv": [
        c("Conv", grid(1, 2, 6, 6), "w", "b", consts=W, attrs={"pads": [1, 1, 1, 1]}),
        c("Conv", grid(1, 2, 7, 7), "w", consts=W, attrs={"strides": [2, 2]}, name="stride"),
        c(
            "Conv",
            grid(1, 2, 7, 8),
            "w",
            consts=W,
            name="asym",
            attrs={"strides": [2, 3], "pads": [0, 2, 1, 0]},
        ),
        c(
            "Conv",
            grid(1, 2, 9, 9),
            "w",
            consts=W,
            name="dilated",
            attrs={"dilations": [2, 2], "pads": [2, 1, 2, 2]},
        ),
        c(
            "Conv",
            grid(1, 4, 6, 6),
            "w",
            consts={"w": rand(6, 2, 3, 3)},
            name="groups",
            attrs={"group": 2, "pads": [1, 0, 1, 2]},
        ),
        c(
            "Conv",
            grid(1, 3, 6, 6),
            "w",
            consts={"w": rand(3, 1, 3, 3)},
            name="depthwise",
            attrs={"group": 3, "pads": [1, 1, 1, 1]},
        ),
        c(
            "Conv",
            grid(1, 3, 7, 7),
            "w",
            consts={"w": rand(3, 1, 3, 3)},
            name="dw-stride",
            attrs={"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]},
        ),
        *[
            c(
                "Conv",
                grid(1, 2, 7, 6),
                "w",
                consts=W,
                name=auto.lower(),
                attrs={"auto_pad": auto, "strides": [2, 2]},
            )
            for auto in ("SAME_UPPER", "SAME_LOWER", "VALID")
        ],
        c(
            "Conv",
            grid(1, 2, 6, 6),
            "w",
            consts=W,
            name="same-s1",
            attrs={"auto_pad": "SAME_LOWER"},
        ),
        c(
            "Conv",
            grid(1, 2, 6),
            "w",
            consts={"w": rand(3, 2, 3)},
            name="1d",
            attrs={"pads": [2, 0], "strides": [2]},
        ),
    ],
    "ConvTranspose": [
        c(
            "ConvTranspose",
            grid(1, 2, 3, 3),
            "w",
            "b",
            consts={"w": rand(2, 3, 2, 2), "b": rand(3)},
            attrs={"strides": [2, 2]},
        ),
        c(
            "ConvTranspose",
            grid(1, 2, 3, 4),
            "w",
            consts={"w": rand(2, 3, 3, 3)},
            name="pads",
            attrs={"strides": [2, 2], "pads": [1, 0, 0, 2], "output_padding": [1, 1]},
        ),
        c(
            "ConvTranspose",
            grid(1, 4, 3, 3),
            "w",
            consts={"w": rand(4, 1, 3, 3)},
            name="group",
            attrs={"strides": [2, 2], "group": 2, "dilations": [2, 1]},
        ),
        c(
            "ConvTranspose",
            grid(1, 2, 3, 3),
            "w",
            consts={"w": rand(2, 3, 3, 3)},
            name="same-upper",
            attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        ),
        c(
            "ConvTranspose",
            grid(1, 2, 3, 3),
            "w",
            consts={"w": rand(2, 3, 3, 3)},
            name="output-shape",
            attrs={"strides": [2, 2], "output_shape": [6, 5]},
        ),
    ],
    "BatchNormalization": [
        c(
            "BatchNormalization",
            grid(1, 2, 3, 3),
            "s",
            "b",
            "m",
            "v",
            consts={"s": rand(2) + 1, "b": rand(2), "m": rand(2), "v": np.abs(rand(2)) + 0.5},
        )
    ],
    "LayerNormalization": [
        c(
            "LayerNormalization",
            rand(2, 3, 4, scale=1.0),
            "s",
            "b",
            consts={"s": rand(4) + 1, "b": rand(4)},
        ),
        c(
            "LayerNormalization",
            rand(2, 3, 2, 2, scale=1.0),
            "s",
            "b",
            consts={"s": rand(3, 2, 2) + 1, "b": rand(3, 2, 2)},
            attrs={"axis": 1, "epsilon": 1e-3},
            name="axis1",
        ),
    ],
    "Gemm": [
        c(
            "Gemm",
            grid(2, 4),
            "w",
            "b",
            consts={"w": rand(3, 4), "b": rand(3)},
            attrs={"transB": 1, "alpha": 0.5},
        ),
        c("Gemm", grid(4, 2), "w", consts={"w": rand(4, 3)}, attrs={"transA": 1}, name="transA"),
        c("Gemm", grid(2, 4), "z", feeds={"z": grid(4, 3, seed=4)}, name="both"),
    ],
    "MatMul": [
        c("MatMul", grid(1, 2, 3, 4), "w", consts={"w": rand(4, 5)}),
        c("MatMul", grid(2, 3, 4), "z", feeds={"z": grid(4, 2, seed=5)}, name="both"),
    ],
    "MaxPool": [
        c("MaxPool", grid(1, 2, 6, 6), attrs={"kernel_shape": [2, 2], "strides": [2, 2]}),
        c(
            "MaxPool",
            grid(2, 2, 7, 7),
            name="overlap",
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        ),
        c(
            "MaxPool",
            grid(1, 2, 7, 6),
            name="ceil",
            attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
        ),
    ],
    "AveragePool": [
        c("AveragePool", grid(1, 2, 6, 6), attrs={"kernel_shape": [2, 2], "strides": [2, 2]}),
        *[
            c(
                "AveragePool",
                grid(1, 2, 7, 6),
                name=f"pads-{inc}-{ceil}",
                attrs={
                    "kernel_shape": [3, 3],
                    "strides": [2, 2],
                    "pads": [1, 0, 1, 1],
                    "count_include_pad": inc,
                    "ceil_mode": ceil,
                },
            )
            for inc in (0, 1)
            for ceil in (0, 1)
        ],
    ],
    "GlobalAveragePool": [c("GlobalAveragePool", grid(1, 2, 3, 4))],
    "GlobalMaxPool": [c("GlobalMaxPool", grid(1, 2, 3, 4))],
    "ReduceSum": [
        c("ReduceSum", grid(1, 2, 3, 4), "a", consts={"a": np.array([2, 3])}),
        c(
            "ReduceSum",
            grid(1, 2, 3),
            "a",
            consts={"a": np.array([1])},
            attrs={"keepdims": 0},
            name="squeezed",
        ),
    ],
    "ReduceMean": [
        c("ReduceMean", grid(1, 2, 3, 4), attrs={"axes": [-1], "keepdims": 0}),
        c("ReduceMean", grid(1, 2, 3, 4), name="all"),
    ],
    "Concat": [
        c("Concat", grid(1, 2, 3, 3), "z", feeds={"z": grid(1, 3, 3, 3, seed=2)}, attrs={"axis": 1})
    ],
    "Split": [
        c(
            "Split",
            grid(1, 5, 2, 2),
            "s",
            consts={"s": np.array([2, 3])},
            n_out=2,
            output=1,
            attrs={"axis": 1},
        )
    ],
    "Slice": [
        c(
            "Slice",
            grid(1, 4, 5, 5),
            "s",
            "e",
            "a",
            consts={"s": np.array([1, -4]), "e": np.array([3, 99]), "a": np.array([1, 3])},
        )
    ],
    "Pad": [c("Pad", grid(1, 2, 3, 4), "p", consts={"p": np.array([0, 0, 1, -1, 0, 1, 2, 0])})],
    "Reshape": [c("Reshape", grid(1, 2, 3, 4), "s", consts={"s": np.array([1, -1, 4])})],
    "Flatten": [c("Flatten", grid(1, 2, 3, 4), attrs={"axis": 1})],
    "Transpose": [c("Transpose", grid(1, 2, 3, 4), attrs={"perm": [0, 2, 3, 1]})],
    "Squeeze": [c("Squeeze", grid(1, 2, 1, 4), "a", consts={"a": np.array([2])})],
    "Unsqueeze": [c("Unsqueeze", grid(1, 2, 4), "a", consts={"a": np.array([1])})],
    "Gather": [
        # Repeated and negative indices: their gradients must add up.
        c("Gather", grid(2, 4, 3), "i", consts={"i": np.array([3, -1, 0, 3])}, attrs={"axis": 1}),
        c(
            "Gather",
            grid(2, 4, 3),
            "i",
            consts={"i": np.array(2)},
            attrs={"axis": 2},
            name="scalar",
        ),
        c(
            "Gather",
            grid(6, 2),
            "i",
            consts={"i": np.array([[0, 5, 5], [1, 2, 0]])},
            name="indices2d-axis0",
        ),
    ],
    "Expand": [c("Expand", grid(1, 2, 1, 3), "s", consts={"s": np.array([2, 1, 4, 3])})],
    "Resize": [
        *[
            c(
                "Resize",
                grid(1, 2, 3, 4),
                "",
                "sc",
                consts={"sc": np.float32([1, 1, 2, 1.5])},
                name=f"{mode}-{ctm}",
                attrs={"mode": mode, "coordinate_transformation_mode": ctm},
            )
            for mode in ("nearest", "linear", "cubic")
            for ctm in ("half_pixel", "asymmetric", "pytorch_half_pixel")
        ],
        c(
            "Resize",
            grid(1, 2, 3, 4),
            "",
            "",
            "sz",
            consts={"sz": np.array([1, 2, 7, 5])},
            name="sizes-align",
            attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        ),
        c(
            "Resize",
            grid(1, 2, 6, 6),
            "",
            "sc",
            consts={"sc": np.float32([1, 1, 0.5, 0.5])},
            name="down",
            attrs={"mode": "linear"},
        ),
    ],
}


def p(op, x, *extra, params: dict[str, np.ndarray], consts=None, name="param", **kw) -> Case:
    """Case whose weights `params` are graph inputs, differentiated as during training."""
    return c(op, x, *extra, feeds=params, consts=consts, name=name, params=tuple(params), **kw)


# Parameter gradients (training): the weights are graph inputs, no batch axis.
PARAM_CASES = [
    p("Conv", grid(1, 2, 6, 6), "w", "b", params=dict(W), attrs={"pads": [1, 1, 1, 1]}),
    p(
        "Conv",
        grid(2, 2, 7, 8),
        "w",
        "b",
        params=dict(W),
        attrs={"strides": [2, 3], "pads": [0, 2, 1, 0]},
        name="param-asym",
    ),
    p(
        "Conv",
        grid(1, 2, 9, 9),
        "w",
        params={"w": W["w"]},
        attrs={"dilations": [2, 2], "pads": [1, 2, 2, 1]},
        name="param-dilated",
    ),
    p(
        "Conv",
        grid(2, 4, 7, 7),
        "w",
        params={"w": rand(6, 2, 3, 3)},
        attrs={"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]},
        name="param-grouped",
    ),
    p(
        "Conv",
        grid(2, 3, 6, 6),
        "w",
        "b",
        params={"w": rand(3, 1, 3, 3), "b": rand(3)},
        attrs={"group": 3, "pads": [1, 1, 1, 1]},
        name="param-depthwise",
    ),
    p(
        "Conv",
        grid(2, 3, 3, 3),
        "w",
        params={"w": rand(20, 3, 3, 3)},
        attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]},
        name="param-few-positions",  # 4 positions, 20 channels: the batch folded in
    ),
    p(
        "ConvTranspose",
        grid(2, 2, 3, 3),
        "w",
        "b",
        params={"w": rand(2, 3, 2, 2), "b": rand(3)},
        attrs={"strides": [2, 2]},
    ),
    p(
        "ConvTranspose",
        grid(2, 12, 2, 2),
        "w",
        params={"w": rand(12, 2, 3, 3)},
        name="param-few-positions",
    ),
    p(
        "ConvTranspose",
        grid(1, 2, 3, 4),
        "w",
        params={"w": rand(2, 3, 3, 3)},
        attrs={"strides": [2, 2], "pads": [1, 0, 0, 2], "output_padding": [1, 1]},
        name="param-pads",
    ),
    p(
        "ConvTranspose",
        grid(1, 4, 3, 3),
        "w",
        params={"w": rand(4, 1, 3, 3)},
        attrs={"strides": [2, 2], "group": 2, "dilations": [2, 1]},
        name="param-group",
    ),
    p(
        "BatchNormalization",
        grid(2, 2, 3, 3),
        "s",
        "b",
        "m",
        "v",
        params={"s": rand(2) + 1, "b": rand(2)},
        consts={"m": rand(2), "v": np.abs(rand(2)) + 0.5},
    ),
    p(
        "LayerNormalization",
        rand(2, 3, 4, scale=1.0),
        "s",
        "b",
        params={"s": rand(4) + 1, "b": rand(4)},
    ),
    p("PRelu", grid(2, 2, 3, 3), "s", params={"s": rand(2, 1, 1) + 1}),
    p(
        "Gemm",
        grid(2, 4),
        "w",
        "b",
        params={"w": rand(3, 4), "b": rand(3)},
        attrs={"transB": 1, "alpha": 0.5},
    ),
    p("MatMul", grid(2, 3, 4), "w", params={"w": rand(4, 5)}),
    p("Mul", grid(2, 2, 3, 3), "k", params={"k": rand(2, 1, 1)}),
    p("Add", grid(2, 2, 3, 3), "k", params={"k": rand(2, 1, 1)}),
]
for _case in PARAM_CASES:
    CASES[_case.op].append(_case)

CASES["Where"][0].inputs = ["c", "x", "z"]
CASES["Where"][0].consts = {"c": grid(1, 2, 3, 3, seed=9) > 0}


def _case_params():
    return [
        pytest.param(case, id=f"{op}-{case.name}") for op in sorted(CASES) for case in CASES[op]
    ]


def _with_seed(model: onnx.ModelProto, output: str, shape) -> onnx.ModelProto:
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, shape))
    return model


def _fd_elementwise(model, feeds, output, seed, name) -> np.ndarray:
    """Central differences of sum(seed * output) w.r.t. every element of input `name`."""
    sess = session(model, optimize=False)

    def objective(x):
        (y,) = sess.run([output], {**feeds, name: x})
        return float(np.sum(seed.astype(np.float64) * y))

    base = feeds[name]
    grad = np.zeros(base.shape, np.float64)
    for i in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[i] += EPS
        down[i] -= EPS
        grad[i] = (objective(up) - objective(down)) / (2 * EPS)
    return grad


def _check(case: Case) -> None:
    model = case.model()
    output = f"y{case.output}"
    (y,) = session(model).run([output], case.feeds)
    seed = rand(*y.shape, seed=7, scale=1.0)
    proto = _with_seed(prepare(load(model)), output, y.shape)
    wrt = list(case.feeds)
    grad_model, names = backward(proto, output, wrt, "seed")
    got = session(grad_model).run([names[w] for w in wrt], {**case.feeds, "seed": seed})
    for w, g in zip(wrt, got, strict=True):
        want = _fd_elementwise(model, case.feeds, output, seed, w)
        assert g.shape == case.feeds[w].shape
        np.testing.assert_allclose(g, want, rtol=1e-2, atol=5e-3, err_msg=f"d/d{w}")


def test_every_rule_has_a_case():
    assert sorted(VJP_RULES) == sorted(CASES)


@pytest.mark.parametrize("case", _case_params())
def test_rule_matches_finite_differences(case: Case):
    _check(case)


def test_duplicate_rule_is_refused():
    with pytest.raises(ValueError, match="duplicate VJP rule for op 'Relu'"):
        vjp("Relu")(lambda g, s: (s.g,))


# -- whole networks ---------------------------------------------------------------------------
def _fd_channel_sums(model, feeds, name, output, category, axis=1, mask=None) -> np.ndarray:
    """(N, C) central differences of S when a whole channel of `name` shifts, in the full
    model: an independent reference for every backend."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        node.output[:] = [f"{o}__pre" if o == name else o for o in node.output]
    m.graph.input.append(helper.make_tensor_value_info("delta", TensorProto.FLOAT, None))
    m.graph.node.append(helper.make_node("Add", [f"{name}__pre", "delta"], [name]))
    m.graph.output.extend(
        [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in (name, output)]
    )
    sess = session(m, optimize=False)
    base = sess.run([name], {**feeds, "delta": np.zeros((), np.float32)})[0]
    eps = 1e-3 * float(np.sqrt(np.mean(base.astype(np.float64) ** 2)))

    def score(delta):
        (y,) = sess.run([output], {**feeds, "delta": delta})
        taken = np.take(y.astype(np.float64), category, axis=axis)
        taken = taken * mask if mask is not None else taken
        return taken.reshape(len(taken), -1).sum(1)

    sums = np.zeros(base.shape[:2])
    for ch in range(base.shape[1]):
        delta = np.zeros(base.shape, np.float32)
        delta[:, ch] = eps
        sums[:, ch] = (score(delta) - score(-delta)) / (2 * eps)
    return sums


def _assert_sums(got, want):
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max() + 1e-6)


def segmenter(opset: int = 17, nhwc_out: bool = False):
    """Every op family an exported segmenter mixes; returns (model, conv outputs, output)."""
    b = NetBuilder((2, 3, 16, 16), opset=opset, seed=3)
    c1 = b.conv(b.input, 8, stride=2, pads=[0, 0, 1, 1])
    x = b.hardswish(b.bn(c1))
    c2 = b.conv(x, 8, group=8)
    x = b.se(b.prelu(c2))
    c3 = b.conv(b.maxpool(x, k=3, stride=2, pads=(1, 1, 1, 1)), 12, dilation=2)
    up = b.resize(b.clip(c3), 2.0, "linear")
    x = b.concat([up, b.leaky_relu(b.conv(x, 4, k=1))])
    c4 = b.conv(b.avgpool(x), 6)
    up2 = b.conv_transpose(b.unary("Sigmoid", c4), 5, k=4, stride=4)
    out = b.transpose(up2, [0, 2, 3, 1]) if nhwc_out else up2
    return b.build([out]), [c1, c2, c3, c4], out


def classifier():
    b = NetBuilder((2, 3, 12, 12), seed=4)
    c1 = b.conv(b.input, 6)
    x = b.relu(b.bn(c1))
    c2 = b.conv(x, 6, auto_pad="SAME_UPPER", stride=2)
    y = b.relu(b.bn(c2))
    c3 = b.conv(b.pad(y, [0, 0, 1, 1, 0, 0, 1, 1]), 6, k=3, pads=[0, 0, 0, 0])
    x = b.add(b.maxpool(x), b.relu(c3))
    logits = b.gemm(b.flatten(b.gap(b.matmul(x, 6))), 5)
    return b.build([b.softmax(logits)]), [c1, c2, c3], logits


def _feeds(shape=(2, 3, 16, 16)):
    return {"input": rand(*shape, seed=11, scale=1.0)}


@pytest.mark.parametrize("nhwc", [False, True])
def test_segmenter_channel_sums_match_finite_differences(nhwc):
    from onnxcut.grad import channel_sums

    model, convs, out = segmenter(nhwc_out=nhwc)
    axis = -1 if nhwc else 1
    mask = (rand(16, 16, seed=5) > 0).astype(np.float32)
    got = channel_sums(model, _feeds(), convs, out, category=2, axis=axis, mask=mask)
    for name in convs:
        _assert_sums(got[name], _fd_channel_sums(model, _feeds(), name, out, 2, axis, mask))


def test_classifier_logits_before_softmax():
    from onnxcut.grad import gradients

    model, convs, logits = classifier()
    feeds = _feeds((2, 3, 12, 12))
    got = gradients(model, feeds, convs, logits, category=3)
    for name in convs:
        assert got[name].shape[:2] == (2, 6)
        _assert_sums(got[name].sum(axis=(2, 3)), _fd_channel_sums(model, feeds, name, logits, 3))


def tflite_style():
    """NHWC input behind a Transpose, a channel Pad widening a residual, an SE gate."""
    b = NetBuilder((2, 3, 16, 16), layout="nhwc", seed=5)
    c1 = b.conv(b.input, 4, stride=2)
    x = b.relu(c1)
    c2 = b.conv(x, 6)
    x = b.relu(b.add(b.pad(x, [0, 0, 0, 0, 0, 2, 0, 0]), b.se(c2)))
    c3 = b.conv(b.maxpool(x, k=3, stride=2, pads=(1, 1, 1, 1)), 5)
    out = b.transpose(b.resize(c3, 4.0), [0, 2, 3, 1])
    return b.build([out]), [c1, c2, c3], out


NETS = {
    "segmenter": (segmenter, 1),
    "segmenter-nhwc": (lambda: segmenter(nhwc_out=True), -1),
    "classifier": (lambda: classifier(), 1),
    "tflite": (tflite_style, -1),
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_categories_batched_equal_one_at_a_time(net):
    from onnxcut.grad import GradientSession

    build, axis = NETS[net]
    model, convs, out = build()
    sess = GradientSession(model, convs, out, axis=axis)
    assert sess.batched
    feeds = _feeds((2, 16, 16, 3) if net == "tflite" else (2, 3, 16, 16))
    if net == "classifier":
        feeds, masks = _feeds((2, 3, 12, 12)), [None] * 3
    else:
        masks = [np.ones((16, 16)), (rand(2, 16, 16, seed=6) > 0), np.eye(16)]
    cats = [4, 0, 4]
    both = sess.run(feeds, cats, None if masks[0] is None else masks)
    for k, (cat, mask) in enumerate(zip(cats, masks, strict=True)):
        one = sess.run(feeds, [cat], mask)
        for name in convs:
            np.testing.assert_allclose(
                both.gradients[name][k], one.gradients[name][0], rtol=1e-5, atol=1e-6
            )
            np.testing.assert_array_equal(both.activations[name], one.activations[name])


def test_old_opset_upsample_is_converted_and_differentiated():
    b = NetBuilder((1, 2, 6, 6), opset=9, seed=2)
    c1 = b.conv(b.input, 3)
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    up = b._node("Upsample", [b.relu(c1), scales], mode="linear")
    out = b.conv(up, 2, k=1)
    model = b.build([out])
    from onnxcut.grad import channel_sums

    feeds = {"input": rand(1, 2, 6, 6, seed=3, scale=1.0)}
    got = channel_sums(model, feeds, [c1], out, category=1)
    _assert_sums(got[c1], _fd_channel_sums(model, feeds, c1, out, 1))


def test_finite_diff_backend_matches_symbolic():
    from onnxcut.grad import channel_sums

    model, convs, out = segmenter()
    mask = np.ones((16, 16), np.float32)
    sym = channel_sums(model, _feeds(), convs[2:], out, 1, mask=mask)
    fd = channel_sums(model, _feeds(), convs[2:], out, 1, mask=mask, backend="finite-diff")
    for name in convs[2:]:
        _assert_sums(fd[name], sym[name])


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_model_channel_sums(name):
    path = SAMPLE_MODELS / f"{name}.onnx"
    assert path.exists(), f"{path} missing: samples/train.py writes it"
    from onnxcut.grad import channel_sums

    model = load(path)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    picked = [convs[1], convs[len(convs) // 2], convs[-2]]
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: rand(*shape, seed=12, scale=1.0)}
    out = model.graph.output[0].name
    got = channel_sums(model, feeds, picked, out, category=1)
    for t in picked:
        _assert_sums(got[t], _fd_channel_sums(model, feeds, t, out, 1))


# -- bad inputs -------------------------------------------------------------------------------
def _tiny():
    b = NetBuilder((1, 3, 8, 8))
    c1 = b.conv(b.input, 4)
    side = b.conv(b.input, 4)
    out = b.conv(b.relu(c1), 3, k=1)
    return b, c1, side, out


def test_op_without_rule_names_node_and_suggests_finite_diff():
    from onnxcut.grad import gradients

    b, c1, _, _ = _tiny()
    out = b.conv(b.unary("Softplus", c1), 2, k=1)
    model = b.build([out])
    with pytest.raises(UnsupportedOpError) as err:
        gradients(model, _feeds((1, 3, 8, 8)), [c1], out, 0)
    message = str(err.value)
    assert "(Softplus): no VJP rule; supported: Add, AveragePool" in message
    assert "--grad finite-diff" in message and "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"wrt": ["nope"]}, ModelError, "tensor 'nope' is not in the graph"),
        ({"wrt": ["SIDE"]}, ModelError, "does not lead to output"),
        ({"output": "nope"}, ModelError, "output 'nope' is not a tensor"),
        ({"category": 3}, DataError, "category 3 is out of range"),
        ({"category": -1}, DataError, "category -1 is out of range"),
        ({"mask": np.ones((7, 8))}, DataError, "does not broadcast"),
        ({"axis": 4}, DataError, "axis 4 is out of range"),
        ({"backend": "magic"}, OnnxcutError, "backend 'magic' unknown"),
        ({"backend": "finite-diff"}, OnnxcutError, "per-channel sums only"),
    ],
)
def test_bad_inputs_are_one_line_errors(kwargs, error, text):
    from onnxcut.grad import gradients

    b, c1, side, out = _tiny()
    model = b.build([out, side])
    args = {"wrt": [c1], "output": out, "category": 0, **kwargs}
    args["wrt"] = [side if w == "SIDE" else w for w in args["wrt"]]
    with pytest.raises(error, match=text) as err:
        gradients(model, _feeds((1, 3, 8, 8)), **args)
    assert "\n" not in str(err.value)


def test_dynamic_shape_asks_for_input_shape():
    from onnxcut.grad import GradientSession, gradients

    b, c1, _, _ = _tiny()
    out = b.conv(b.relu(c1), 3, stride=2)
    model = b.build([out])
    for d in (0, 2, 3):
        model.graph.input[0].type.tensor_type.shape.dim[d].dim_param = f"d{d}"
    model.graph.output[0].type.tensor_type.ClearField("shape")
    with pytest.raises(
        ModelError,
        match=r"\(Conv\): its gradient needs the static shape.*"
        r"--input-shape",
    ):
        GradientSession(model, [c1], out)
    # A one-off call takes the missing sizes from its feeds.
    assert gradients(model, _feeds((1, 3, 8, 8)), [c1], out, 0)[c1].shape == (1, 4, 8, 8)


def test_finite_diff_refuses_positive_part():
    from onnxcut.grad import channel_sums

    b, c1, _, out = _tiny()
    with pytest.raises(OnnxcutError, match="signed channel sums only"):
        channel_sums(
            b.build([out]), _feeds((1, 3, 8, 8)), [c1], out, 0, backend="finite-diff", positive=True
        )


def test_positive_part_sums_only_positive_gradients():
    from onnxcut.grad import GradientSession, channel_sums, reduce_channels

    model, convs, out = segmenter()
    pos = channel_sums(model, _feeds(), convs, out, 2, positive=True)
    grads = GradientSession(model, convs, out).run(_feeds(), [2]).gradients
    for name in convs:
        want = np.maximum(grads[name][0], 0).sum(axis=(2, 3))
        np.testing.assert_allclose(pos[name], want, rtol=1e-5, atol=1e-6)
        assert (reduce_channels(grads[name], True, 3)[0] >= 0).all()


def test_symbolic_matches_ort_training():
    from onnxcut.grad import gradients
    from onnxcut.grad.orttraining import available

    if not available():
        pytest.skip("onnxruntime-training not installed here (it needs its own environment)")
    b = NetBuilder((2, 3, 12, 12), seed=6)
    c1 = b.conv(b.input, 6)
    x = b.maxpool(b.relu(c1), k=3, stride=2, pads=(1, 1, 1, 1))
    c2 = b.conv(x, 6, stride=2)
    c3 = b.conv(b.leaky_relu(c2), 6, group=6)
    logits = b.gemm(b.flatten(b.gap(b.add(c3, c2))), 4)
    model = b.build([logits])
    feeds = _feeds((2, 3, 12, 12))
    ours = gradients(model, feeds, [c1, c2, c3], logits, 2)
    theirs = gradients(model, feeds, [c1, c2, c3], logits, 2, backend="ort-training")
    for name in (c1, c2, c3):
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-5)


# Cases whose nodes mix the batch axis (or whose differentiated input has no batch axis):
# the driver must refuse to stack category copies there.
NOT_BATCHABLE = {
    "Expand-Expand",
    "Gather-indices2d-axis0",
    "Gemm-transA",
    "Gemm-both",
    "MatMul-both",
    "ReduceMean-all",
    "Sub-Sub",
}


@pytest.mark.parametrize("case", _case_params())
def test_rule_batched_over_categories_matches_one_at_a_time(case: Case):
    """Two seeds stacked as one backward batch of two category copies give each copy's
    unbatched gradient, or the driver refuses the batching."""
    model = case.model()
    output = f"y{case.output}"
    (y,) = session(model).run([output], case.feeds)
    seeds = [rand(*y.shape, seed=7, scale=1.0), rand(*y.shape, seed=8, scale=1.0)]
    wrt = list(case.feeds)
    proto = _with_seed(prepare(load(model)), output, [2 * y.shape[0], *y.shape[1:]])
    proto.graph.input.append(helper.make_tensor_value_info("copies", TensorProto.INT64, [1]))
    if f"{case.op}-{case.name}" in NOT_BATCHABLE:
        with pytest.raises(BatchError, match="one at a time"):
            backward(proto, output, wrt, "seed", repeats="copies")
        return
    batched, names = backward(proto, output, wrt, "seed", repeats="copies", params=case.params)
    got = session(batched).run(
        [names[w] for w in wrt],
        {**case.feeds, "seed": np.concatenate(seeds), "copies": np.array([2], np.int64)},
    )
    plain, plain_names = backward(
        _with_seed(prepare(load(model)), output, y.shape), output, wrt, "seed"
    )
    wants = [
        session(plain).run([plain_names[w] for w in wrt], {**case.feeds, "seed": seed})
        for seed in seeds
    ]
    for i, w in enumerate(wrt):
        if w in case.params:  # a weight's gradient sums over the copies
            total = wants[0][i] + wants[1][i]
            np.testing.assert_allclose(got[i], total, rtol=1e-5, atol=1e-5, err_msg=f"d/d{w}")
    for k, want in enumerate(wants):
        for w, g, one in zip(wrt, got, want, strict=True):
            if w in case.params:
                continue
            n = one.shape[0]
            rows = g.reshape(2 * n, *one.shape[1:])  # (K*N, ...) or (K, N, ...)
            np.testing.assert_allclose(
                rows[k * n : (k + 1) * n], one, rtol=1e-5, atol=1e-6, err_msg=f"copy {k}, d/d{w}"
            )


def batch_mixing():
    """A Transpose that moves the batch axis: categories must run one at a time."""
    b = NetBuilder((2, 3, 16, 16), seed=8)
    c1 = b.conv(b.input, 4)
    x = b.transpose(b.relu(b.transpose(c1, [1, 0, 2, 3])), [1, 0, 2, 3])
    c2 = b.conv(x, 5)
    return b.build([c2]), [c1, c2], c2


@pytest.mark.parametrize("net", [*sorted(NETS), "batch-mixing"])
def test_split_session_equals_one_session(net):
    """forward() then backward() on two sessions gives run()'s results bit for bit, and
    forward() returns the asked forward tensors as a plain session computes them."""
    from onnxcut.grad import GradientSession

    build, axis = NETS.get(net, (batch_mixing, 1))
    model, convs, out = build()
    whole = GradientSession(model, convs, out, axis=axis)
    split = GradientSession(model, convs, out, axis=axis, forward_outputs=[out, convs[0]])
    assert split.batched == whole.batched == (net != "batch-mixing")
    feeds = _feeds(
        {"tflite": (2, 16, 16, 3), "classifier": (2, 3, 12, 12)}.get(net, (2, 3, 16, 16))
    )
    masks = None if net == "classifier" else [np.ones((16, 16)), rand(2, 16, 16, seed=6) > 0]
    values = split.forward(feeds)
    (want,) = session(expose_tensors(model, [out])).run([out], feeds)
    np.testing.assert_allclose(values[out], want, rtol=1e-5, atol=1e-6)  # other fusions
    got = split.backward(feeds, values, [3, 1], masks)
    ref = whole.run(feeds, [3, 1], masks)
    for name in convs:
        np.testing.assert_array_equal(got.gradients[name], ref.gradients[name])
        np.testing.assert_array_equal(got.activations[name], ref.activations[name])
    again = split.run(feeds, [3, 1], masks)  # run() on a split session: both halves
    np.testing.assert_array_equal(again.gradients[convs[0]], ref.gradients[convs[0]])


def test_split_session_refuses_unknown_forward_output():
    from onnxcut.grad import GradientSession

    model, convs, out = segmenter()
    with pytest.raises(ModelError, match="forward output 'nope' is not a tensor"):
        GradientSession(model, convs, out, forward_outputs=["nope"])


def chunked():
    """x.chunk(2, 1) and interpolate(size=x.shape[2:]) as the PyTorch exporter writes them
    (bounds and sizes from Shape arithmetic), in a model with a 1-D tensor long enough that
    ONNX data propagation is off (shapes.infer_shapes)."""
    b = NetBuilder((1, 3, 8, 8), seed=4)

    def conv(x, cin, cout, k, **kw):  # channel counts given: the builder cannot infer them
        w, bias = b.const(rand(cout, cin, k, k, seed=cout)), b.const(rand(cout, seed=k))
        return b._node("Conv", [x, w, bias], kernel_shape=[k, k], **kw)

    c1 = conv(b.input, 3, 6, 3, pads=[1, 1, 1, 1])
    shape = b._node("Shape", [c1])
    half = b._node("Div", [b._node("Gather", [shape, b._int64([1])], axis=0), b._int64([2])])
    axis = b._int64([1])
    x1 = b._node("Slice", [c1, b._int64([0]), half, axis])
    x2 = b._node("Slice", [c1, half, b._int64([1 << 30]), axis])
    c2 = conv(b.relu(x2), 3, 3, 3, pads=[1, 1, 1, 1], strides=[2, 2])
    spatial = b._node("Slice", [shape, b._int64([2]), b._int64([4])])
    sizes = b._node("Concat", [b._int64([1, 3]), spatial], axis=0)
    up = b._node("Resize", [c2, "", "", sizes], mode="nearest")
    wide = conv(b.concat([x1, up]), 6, 1100, 1)
    logits = b._node("Gemm", [b.flatten(b.gap(b.relu(wide))), b.const(rand(4, 1100))], transB=1)
    return b._model([logits], check=False), [c1, c2], logits


def test_shape_arithmetic_is_folded_for_the_rules():
    from onnxcut.grad import gradients

    model, convs, logits = chunked()
    feeds = _feeds((1, 3, 8, 8))
    got = gradients(model, feeds, convs, logits, category=2)
    for name in convs:
        _assert_sums(got[name].sum(axis=(2, 3)), _fd_channel_sums(model, feeds, name, logits, 2))
