"""ort-training backend: onnxruntime-training's GradientGraphBuilder, where it is installed.

onnxruntime-training replaces the `onnxruntime` package, so it lives in an environment of its
own. Known limits (1.19.2): models of IR version 11 or newer are refused; no gradient
builder for BatchNormalization, HardSwish, HardSigmoid or PRelu; ResizeGrad has no CPU
kernel; `import onnxruntime.training` needs torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from onnxcut.errors import DataError, ModelError, RuntimeMissingError, first_line
from onnxcut.graph.io import GraphIndex

_INSTALL = (
    "the ort-training backend needs onnxruntime-training in an environment of its own: "
    "python -m venv ortt && ortt/bin/pip install onnxruntime-training==1.19.2 torch==2.13.0 "
    "(it replaces the onnxruntime package)"
)
_MAX_IR = 10


def available() -> bool:
    """Whether this environment's onnxruntime has the gradient graph builder."""
    try:
        from onnxruntime.capi._pybind_state import GradientGraphBuilder  # noqa: F401
    except ImportError:
        return False
    return True


def ort_gradients(
    model: ModelProto,
    feeds: Mapping[str, np.ndarray],
    wrt: Sequence[str],
    output: str,
    category: int,
    axis: int,
    mask: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Return dS/dT for each T in `wrt`, computed by onnxruntime-training's gradient graph."""
    if not available():
        raise RuntimeMissingError(_INSTALL)
    import onnxruntime as ort
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    if model.ir_version > _MAX_IR:
        raise ModelError(
            f"ort-training refuses IR version {model.ir_version} (newest it reads: {_MAX_IR}); "
            "use --grad symbolic"
        )
    with_loss = _with_objective(model, output, category, axis, mask)
    try:
        builder = GradientGraphBuilder(
            with_loss.SerializeToString(), {"onnxcut_loss"}, set(wrt), "onnxcut_loss"
        )
        builder.build()
    except Exception as e:  # the builder raises bare RuntimeErrors naming the op
        raise ModelError(
            f"ort-training cannot differentiate the model ({first_line(e)}); use --grad symbolic"
        ) from None
    grads = [f"{name}_grad" for name in wrt]
    sess = ort.InferenceSession(builder.get_model(), providers=["CPUExecutionProvider"])
    values = sess.run(grads, dict(feeds))
    return dict(zip(wrt, values, strict=True))


def _with_objective(
    model: ModelProto, output: str, category: int, axis: int, mask: np.ndarray | None
) -> ModelProto:
    """Add the scalar loss S = sum(mask * output[category along axis]) as the only output."""
    index = GraphIndex(model)
    shape = index.shape(output)
    if shape is None:
        raise ModelError(f"output '{output}' has unknown rank; pass --input-shape")
    classes = shape[axis % len(shape)]
    if isinstance(classes, int) and not 0 <= category < classes:
        raise DataError(
            f"category {category} is out of range: output '{output}' has {classes} categories"
        )
    new = ModelProto()
    new.CopyFrom(model)
    g = new.graph
    g.initializer.append(numpy_helper.from_array(np.asarray(category, np.int64), "onnxcut_cat"))
    g.node.append(helper.make_node("Gather", [output, "onnxcut_cat"], ["onnxcut_taken"], axis=axis))
    taken = "onnxcut_taken"
    if mask is not None:
        g.initializer.append(numpy_helper.from_array(np.asarray(mask, np.float32), "onnxcut_mask"))
        g.node.append(helper.make_node("Mul", [taken, "onnxcut_mask"], ["onnxcut_masked"]))
        taken = "onnxcut_masked"
    g.node.append(helper.make_node("ReduceSum", [taken], ["onnxcut_loss"], keepdims=0))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("onnxcut_loss", TensorProto.FLOAT, []))
    return new
