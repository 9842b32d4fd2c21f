"""The teacher's side of distillation: its category output restricted to the student's
categories, tempered and normalised in its own onnxruntime session."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import ModelProto, helper, numpy_helper

from onnxcut.attribution.probe import find_head
from onnxcut.graph.shapes import graph_inputs, infer_shapes
from onnxcut.runtime import session
from onnxcut.train.graph import BATCH, keep_outputs, set_batch
from onnxcut.train.losses import SCALE, TARGET

# loss kind -> the normalisation the student's loss compares against
NORMALISE = {"softmax": "Softmax", "sigmoid": "Sigmoid"}


class Teacher:
    """Give each batch's target (N, K_student, ...) and the loss scale that weighs it."""

    def __init__(
        self,
        model: ModelProto,
        positions: Sequence[int],
        kind: str,
        temperature: float,
        *,
        weight: float = 1.0,
        provider: str = "cpu",
        threads: int | None = None,
    ):
        head = find_head(model)
        m = ModelProto()
        m.CopyFrom(model)
        self.input = graph_inputs(m)[0].name
        set_batch(m, self.input, BATCH)
        index = numpy_helper.from_array(np.asarray(positions, np.int64), "train/teacher_index")
        temp = numpy_helper.from_array(np.asarray(temperature, np.float32), "train/teacher_t")
        m.graph.initializer.extend([index, temp])
        attrs = {"axis": head.axis} if kind == "softmax" else {}
        m.graph.node.extend(
            [
                helper.make_node(
                    "Gather", [head.score, index.name], ["train/kept"], axis=head.axis
                ),
                helper.make_node("Div", ["train/kept", temp.name], ["train/tempered"]),
                helper.make_node(NORMALISE[kind], ["train/tempered"], [TARGET], **attrs),
            ]
        )
        keep_outputs(m, [TARGET])
        self.axis = head.axis
        self.factor = temperature * weight
        self._session = session(infer_shapes(m), provider, threads)

    def feeds(self, inputs: np.ndarray, real: int) -> dict[str, np.ndarray]:
        """Target and scale for a batch whose first `real` rows are images (the rest pad)."""
        (target,) = self._session.run([TARGET], {self.input: inputs})
        positions = real * (target.size // target.shape[self.axis] // len(target))
        return {TARGET: target, SCALE: np.float32(self.factor / positions)}
