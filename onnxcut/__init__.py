"""onnxcut: cut category-specific sub-networks out of exported CNNs, on the ONNX graph."""

from __future__ import annotations

from onnxcut.attribution import AttributeOptions, attribute
from onnxcut.deps import ChannelGroup, build_groups
from onnxcut.errors import (
    DataError,
    ModelError,
    OnnxcutError,
    OutputError,
    PlanError,
    RuntimeMissingError,
    UnsupportedOpError,
)
from onnxcut.evaluation import EvalOptions, evaluate
from onnxcut.grad import GradientSession, channel_sums, gradients
from onnxcut.graph import GraphIndex, load, save
from onnxcut.inspection import summarize
from onnxcut.plan import Plan, load_plan
from onnxcut.scores import Scores, load_scores, merge, save_scores
from onnxcut.selection import Selection, make_plan
from onnxcut.surgery import extract, mask

__version__ = "0.1.0"

__all__ = [
    "AttributeOptions",
    "ChannelGroup",
    "DataError",
    "EvalOptions",
    "GradientSession",
    "GraphIndex",
    "ModelError",
    "OnnxcutError",
    "OutputError",
    "Plan",
    "PlanError",
    "RuntimeMissingError",
    "Scores",
    "Selection",
    "UnsupportedOpError",
    "__version__",
    "attribute",
    "build_groups",
    "channel_sums",
    "evaluate",
    "extract",
    "gradients",
    "load",
    "load_plan",
    "load_scores",
    "make_plan",
    "mask",
    "merge",
    "save",
    "save_scores",
    "summarize",
]
