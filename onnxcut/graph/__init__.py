"""Graph stage: takes an ONNX file or proto, gives a normalised model.

`load` fixes what exporters do oddly (Constant weights, IR-3 initializer inputs, unnamed
nodes, dynamic shapes, external data); `save` writes atomically; `GraphIndex` finds producers
and consumers by tensor name; `infer_shapes` and `fold_shape_values` give static sizes to
internal models.
"""

from __future__ import annotations

from onnxcut.graph.folding import fold_shape_values
from onnxcut.graph.io import GraphIndex, attrs, expose_tensors, load, opset_version, save, sha256
from onnxcut.graph.shapes import infer_shapes

__all__ = [
    "GraphIndex",
    "attrs",
    "expose_tensors",
    "fold_shape_values",
    "infer_shapes",
    "load",
    "opset_version",
    "save",
    "sha256",
]
