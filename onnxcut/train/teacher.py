"""The teacher's side of distillation: its category output restricted to the student's
categories, tempered and normalised in its own onnxruntime session, and the features the
student's hints are matched to (the teacher's tensors at the student's kept channels)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from onnx import ModelProto, numpy_helper

from onnxcut.attribution.probe import find_head
from onnxcut.errors import ModelError, first_line
from onnxcut.graph.io import opset_version
from onnxcut.graph.shapes import graph_inputs, infer_shapes
from onnxcut.runtime import session
from onnxcut.train.builder import Builder
from onnxcut.train.graph import BATCH, keep_outputs, set_batch
from onnxcut.train.hints import Hint
from onnxcut.train.losses import SCALE, TARGET, hint_scale, hint_target, softmax_pair

FLOOR = 1e-3  # the smallest RMS a hint's teacher feature is measured against

# loss kind -> the normalisation the student's loss compares against: (builder, x, axis)
NORMALISE: dict[str, Callable[[Builder, str, int], str]] = {
    "softmax": lambda b, x, axis: softmax_pair(b, x, axis)[0],
    "sigmoid": lambda b, x, axis: b.op("Sigmoid", [x]),
}


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
        category_axis: int | None = None,
        hints: Mapping[str, Hint] | None = None,
        hint_weight: float = 0.0,
        fold_into: int | None = None,
    ):
        """`fold_into`: the student position (background) that takes the probability of the
        teacher's categories the student dropped, instead of renormalising over the kept."""
        head = find_head(model, axis=category_axis)
        m = ModelProto()
        m.CopyFrom(model)
        self.input = graph_inputs(m)[0].name
        set_batch(m, self.input, BATCH)
        index = numpy_helper.from_array(np.asarray(positions, np.int64), "train/teacher_index")
        temp = numpy_helper.from_array(np.asarray(temperature, np.float32), "train/teacher_t")
        m.graph.initializer.extend([index, temp])
        b = Builder("teacher", opset=opset_version(m))
        tempered = b.op("Div", [head.score, temp.name])
        if fold_into is None:
            kept = b.op("Gather", [tempered, index.name], axis=head.axis)
            b.op("Identity", [NORMALISE[kind](b, kept, head.axis)], TARGET)
        else:
            _fold(b, tempered, index.name, head.axis, len(positions), fold_into)
        self.hints = dict(hints or {})
        outputs = [TARGET]
        for name, h in self.hints.items():
            kept = b.op("Gather", [name, b.ints(h.channels)], hint_target(name), axis=h.axis)
            # The whole tensor's energy sets the scale: a kept set dead on a batch must not.
            square = b.op("Mul", [name, name])
            outputs += [kept, b.reduce("ReduceSum", square, range(1, h.rank), keepdims=0)]
        m.graph.node.extend(b.nodes)
        m.graph.initializer.extend(b.inits)
        keep_outputs(m, outputs)
        self.axis = head.axis
        self.factor = temperature * weight
        self.hint_factor = hint_weight / max(len(self.hints), 1)
        self._outputs = outputs
        self._session = session(infer_shapes(m), provider, threads)

    def feeds(self, inputs: np.ndarray, real: int) -> dict[str, np.ndarray]:
        """Target and scale for a batch whose first `real` rows are images (the rest pad),
        and each hint's teacher feature and scale."""
        try:
            target, *rest = self._session.run(self._outputs, {self.input: inputs})
        except Exception as e:  # onnxruntime's own error types
            raise ModelError(
                f"onnxruntime could not run the teacher on a batch of {len(inputs)}: "
                f"{first_line(e)}; a model exported at a fixed batch may need --batch of it"
            ) from None
        positions = real * (target.size // target.shape[self.axis] // len(target))
        feeds = {TARGET: target, SCALE: np.float32(self.factor / positions)}
        for (name, h), feature, squares in zip(
            self.hints.items(), rest[::2], rest[1::2], strict=True
        ):
            # The kept channels' share of the energy, were it even; no less than an RMS of
            # FLOOR, so that a layer near zero (dead, or a degenerate untrained net) does not
            # make its relative error explode.
            energy = float(squares[:real].sum(dtype=np.float64)) * len(h.channels) / h.width
            floor = FLOOR**2 * real * (feature.size // len(feature))
            scale = self.hint_factor / max(energy, floor)
            feeds[hint_target(name)] = feature
            feeds[hint_scale(name)] = np.float32(scale)
        return feeds


def _fold(b: Builder, tempered: str, index: str, axis: int, kept: int, into: int) -> None:
    """TARGET: the teacher's softmax over all its categories at the kept ones, with the
    dropped ones' probability added at position `into` (background)."""
    probs = b.op("Gather", [softmax_pair(b, tempered, axis)[0], index], axis=axis)
    rest = b.op("Sub", [b.scalar(1.0), b.reduce("ReduceSum", probs, [axis])])
    onehot = np.zeros([kept if i == axis else 1 for i in range(4)], np.float32)
    onehot[(0,) * axis + (into,)] = 1.0
    e = b.name("background")
    b.inits.append(numpy_helper.from_array(onehot, e))
    b.op("Add", [probs, b.op("Mul", [rest, e])], TARGET)
