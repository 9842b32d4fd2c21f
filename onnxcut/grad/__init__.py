"""Reverse-mode differentiation of ONNX graphs into standard ONNX ops."""

from __future__ import annotations

# Importing the rule modules fills VJP_RULES.
from onnxcut.grad import elementwise, nn, pool, shape  # noqa: F401
from onnxcut.grad.api import BACKENDS, channel_sums, gradients, reduce_channels
from onnxcut.grad.backward import backward, prepare
from onnxcut.grad.registry import VJP_RULES, supported_ops
from onnxcut.grad.session import GradientResult, GradientSession

__all__ = [
    "BACKENDS",
    "VJP_RULES",
    "GradientResult",
    "GradientSession",
    "backward",
    "channel_sums",
    "gradients",
    "prepare",
    "reduce_channels",
    "supported_ops",
]
