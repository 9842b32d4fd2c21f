"""Evaluation stage: takes a model and images (with masks or labels), gives its quality.

`evaluate` reports segmentation mIoU or classification top-1, on all categories or on the
chosen ones, with params, FLOPs and onnxruntime latency.
"""

from __future__ import annotations

from onnxcut.evaluation.metrics import EvalOptions, evaluate

__all__ = ["EvalOptions", "evaluate"]
