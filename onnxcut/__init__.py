"""onnxcut: cut category-specific sub-networks out of exported CNNs, on the ONNX graph."""

from __future__ import annotations

from onnxcut.errors import (
    DataError,
    ModelError,
    OnnxcutError,
    OutputError,
    PlanError,
    RuntimeMissingError,
    UnsupportedOpError,
)
from onnxcut.graph import GraphIndex, load, save

__version__ = "0.1.0"

__all__ = [
    "DataError",
    "GraphIndex",
    "ModelError",
    "OnnxcutError",
    "OutputError",
    "PlanError",
    "RuntimeMissingError",
    "UnsupportedOpError",
    "__version__",
    "load",
    "save",
]
