"""Gradient engine: every VJP rule, and whole networks, against central finite differences."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcut.grad import VJP_RULES, backward, prepare
from onnxcut.grad.registry import vjp
from onnxcut.graph import load
from onnxcut.runtime import session

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
