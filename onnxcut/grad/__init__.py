"""Reverse-mode differentiation of ONNX graphs into standard ONNX ops."""

from __future__ import annotations

# Importing the rule modules fills VJP_RULES.
from onnxcut.grad import elementwise, nn, pool, shape  # noqa: F401
from onnxcut.grad.backward import backward, prepare
from onnxcut.grad.registry import VJP_RULES, supported_ops

__all__ = ["VJP_RULES", "backward", "prepare", "supported_ops"]
