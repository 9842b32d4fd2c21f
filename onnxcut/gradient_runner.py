"""Forward and backward sessions for attribution, built once per run.

The backward model takes a seed dS/dscore with one row per (image, category) pair: the seed is
the category's one-hot channel times its mask, so one run returns the gradients of every
present category's masked score sum at once.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, TensorProto, helper

from onnxcut.errors import DataError
from onnxcut.grad.backward import backward, prepare
from onnxcut.graph import GraphIndex
from onnxcut.probe import Head
from onnxcut.runtime import session

SEED = "onnxcut/seed"
REPEATS = "onnxcut/repeats"
BACKENDS = ("symbolic", "finite-diff", "ort-training")


def _with_outputs(model: ModelProto, names: list[str]) -> ModelProto:
    new = ModelProto()
    new.CopyFrom(model)
    have = {o.name for o in new.graph.output}
    new.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have
    )
    return new


class GradientRunner:
    """Activations and gradients of the probed feature maps for one image at a time."""

    def __init__(
        self,
        model: ModelProto,
        head: Head,
        layers: dict[str, str],
        *,
        provider: str = "cpu",
        threads: int | None = None,
        backend: str = "symbolic",
    ):
        if backend != "symbolic":
            raise DataError(
                f"--grad {backend}: attribution needs positive-part gradient sums, which only "
                "the symbolic backend gives (finite differences give signed channel sums); "
                "use --grad symbolic"
            )
        self.head = head
        self.layers = list(layers)
        self.features = dict(layers)
        extra = [head.score] if head.score != head.output else []
        self.forward_session = session(_with_outputs(model, extra), provider, threads)
        self.forward_names = [head.output, *extra]
        prepared = prepare(model)
        shape = GraphIndex(prepared).shape(head.score)
        seeded = ModelProto()
        seeded.CopyFrom(prepared)
        seeded.graph.input.extend(
            [
                helper.make_tensor_value_info(SEED, TensorProto.FLOAT, ["P", *shape[1:]]),
                helper.make_tensor_value_info(REPEATS, TensorProto.INT64, [1]),
            ]
        )
        grad_model, names = backward(
            seeded, head.score, list(layers.values()), SEED, repeats=REPEATS
        )
        feats = list(layers.values())
        self.grad_names = [names[t] for t in feats]
        self.grad_session = session(_with_outputs(grad_model, feats), provider, threads)
        self.input_name = self.forward_session.get_inputs()[0].name

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (score tensor, probabilities output or None) for a batch."""
        outs = self.forward_session.run(self.forward_names, {self.input_name: x})
        if len(outs) == 2:
            return outs[1], outs[0]
        return outs[0], None

    def gradients(self, x: np.ndarray, categories: np.ndarray, masks: np.ndarray):
        """For one image: activations {layer: (1, C, ...)} and gradients {layer: (P, C, ...)}.

        `masks` (P, H, W) (or (P, 1, 1) for classifiers) weight each category's score.
        """
        head = self.head
        p = len(categories)
        seed_shape = [p, *self._score_tail()]
        seed = np.zeros(seed_shape, np.float32)
        moved = np.moveaxis(seed, head.axis, 1)  # (P, K, ...) view
        for row, (k, m) in enumerate(zip(categories, masks, strict=True)):
            moved[row, k] = m if moved[row, k].ndim else m.flat[0]
        feeds = {self.input_name: x, SEED: seed, REPEATS: np.array([p], np.int64)}
        feats = list(self.features.values())
        outs = self.grad_session.run(feats + self.grad_names, feeds)
        acts = dict(zip(self.layers, outs[: len(feats)], strict=True))
        grads = dict(zip(self.layers, outs[len(feats) :], strict=True))
        return acts, grads

    def _score_tail(self) -> list[int]:
        if not hasattr(self, "_tail"):
            for value in self.grad_session.get_inputs():
                if value.name == SEED:
                    self._tail = [int(d) for d in value.shape[1:]]
        return self._tail
