"""Interpolation matrices of a Resize node, measured by running it on basis inputs.

Running the node itself in onnxruntime reproduces every mode and coordinate transform
exactly, where re-deriving them in numpy would drift from the runtime's rounding choices.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcut.errors import UnsupportedOpError
from onnxcut.grad.emitter import Emitter, Site, decoded
from onnxcut.runtime import session


def interpolation_matrices(
    g: Emitter, s: Site, xs: tuple[int, ...], ys: tuple[int, ...]
) -> list[np.ndarray]:
    """Return one (out, in) matrix per spatial axis of a Resize node."""
    if decoded(s.attrs.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise UnsupportedOpError(s.node, "keep_aspect_ratio_policy has no VJP rule")
    rank = len(xs)
    roi, scales, sizes = (_full(g, s, i, rank) for i in (1, 2, 3))
    if scales is not None and not np.allclose(scales[:2], 1):
        raise UnsupportedOpError(s.node, "Resize of the batch or channel axis has no VJP rule")
    if scales is None and sizes is None:
        sizes = np.asarray(ys, np.int64)  # computed sizes, known from shape inference
    return [_measure(g, s, axis, xs, ys, roi, scales) for axis in range(2, rank)]


def _full(g: Emitter, s: Site, i: int, rank: int) -> np.ndarray | None:
    """Input i (roi, scales or sizes) over all axes, undoing the opset-18 `axes` attribute."""
    name = s.input(i)
    if name is None:
        return None
    value = g.value(name)
    if value is None:
        if i == 2:
            raise UnsupportedOpError(
                s.node, "computed scales have no VJP rule; export with sizes or constant scales"
            )
        return None
    value = value.reshape(-1)
    if value.size == 0:
        return None
    axes = s.attrs.get("axes")
    if not axes:
        return value
    fill = {1: 1.0, 2: 1.0, 3: 0}[i]
    full = np.full(rank * (2 if i == 1 else 1), fill, value.dtype)
    for k, a in enumerate(int(a) % rank for a in axes):
        if i == 1:
            full[a], full[rank + a] = value[k], value[len(axes) + k]
        else:
            full[a] = value[k]
    return full


def _measure(g: Emitter, s: Site, axis: int, xs, ys, roi, scales) -> np.ndarray:
    size, out = xs[axis], ys[axis]
    rank = len(xs)
    probe_shape = [1, size] + [1] * (rank - 2)
    probe_shape[axis] = size
    probe_sizes = [1, size] + [1] * (rank - 2)
    probe_sizes[axis] = out
    for other in range(2, rank):
        if other != axis and scales is not None:
            # Enough input along the other axes that the scaled output is not empty.
            probe_shape[other] = min(xs[other], max(1, math.ceil(1.0 / float(scales[other]))))
    probe = np.zeros(probe_shape, np.float32)
    view = np.moveaxis(probe, axis, 2)
    for c in range(size):
        view[0, c, c] = 1.0
    inputs, inits = ["x"], []
    for i, value in ((1, roi), (2, scales), (3, None if scales is not None else probe_sizes)):
        if i >= len(s.node.input) and value is None:
            continue
        if value is None:
            inputs.append("")
            continue
        dtype = np.int64 if i == 3 else np.float32
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), f"in{i}"))
        inputs.append(f"in{i}")
    node_attrs = {k: v for k, v in s.attrs.items() if k != "axes"}
    node = helper.make_node("Resize", inputs, ["y"], **node_attrs)
    graph = helper.make_graph(
        [node],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, probe_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=list(g.index.model.opset_import))
    model.ir_version = g.index.model.ir_version
    (result,) = session(model, optimize=False).run(["y"], {"x": probe})
    moved = np.moveaxis(result, axis, 2)[0, :, :]  # (in, out, rest...)
    matrix = moved.reshape(size, moved.shape[1], -1)[:, :, 0].T
    assert matrix.shape == (out, size), f"probe of '{s.node.name}' gave {matrix.shape}"
    return matrix.astype(np.float64)
