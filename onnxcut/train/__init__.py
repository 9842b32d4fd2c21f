"""Training stage: takes a sub-network (and the model it was cut from), gives it new weights.

Training runs on the ONNX graph with plain onnxruntime: `build` turns a model into one graph
that computes a loss, every trainable parameter's gradient (the `grad` engine's parameter
rules) and an optimizer step; `Trainer` runs it with the weights kept on the device;
`distill` finishes a category sub-network against its teacher without labels.
"""

from __future__ import annotations

from onnxcut.train.distill import DistillOptions, EpochReport, distill
from onnxcut.train.graph import TrainGraph, build
from onnxcut.train.optimizers import OPTIMIZERS, Optimizer
from onnxcut.train.params import trainable

__all__ = [
    "OPTIMIZERS",
    "DistillOptions",
    "EpochReport",
    "Optimizer",
    "TrainGraph",
    "build",
    "distill",
    "trainable",
]
