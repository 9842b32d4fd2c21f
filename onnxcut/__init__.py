"""onnxcut: cut category-specific sub-networks out of exported CNNs, on the ONNX graph."""

from __future__ import annotations

from onnxcut._version import __version__
from onnxcut.assemble import AssembleOptions, Part, assemble
from onnxcut.attribution import (
    AttributeOptions,
    Scores,
    Selection,
    attribute,
    compensate,
    load_scores,
    make_plan,
    merge,
    reconstruct,
    save_scores,
)
from onnxcut.channels import ChannelGroup, Plan, build_groups, extract, load_plan, mask, summarize
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
from onnxcut.report import ReportOptions, report
from onnxcut.train import DistillOptions, distill

__all__ = [
    "AssembleOptions",
    "AttributeOptions",
    "ChannelGroup",
    "DataError",
    "DistillOptions",
    "EvalOptions",
    "GradientSession",
    "GraphIndex",
    "ModelError",
    "OnnxcutError",
    "OutputError",
    "Part",
    "Plan",
    "PlanError",
    "ReportOptions",
    "RuntimeMissingError",
    "Scores",
    "Selection",
    "UnsupportedOpError",
    "__version__",
    "assemble",
    "attribute",
    "build_groups",
    "channel_sums",
    "compensate",
    "distill",
    "evaluate",
    "extract",
    "gradients",
    "load",
    "load_plan",
    "load_scores",
    "make_plan",
    "mask",
    "merge",
    "reconstruct",
    "report",
    "save",
    "save_scores",
    "summarize",
]
