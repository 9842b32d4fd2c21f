"""Forward and backward sessions for attribution, built once per run.

The GradientSession's forward half gives the category probabilities that decide each
image's masks, and the probed activations; its backward half then returns, in one run, the
gradients of every present category's masked score sum.
"""

from __future__ import annotations

import numpy as np
from onnx import ModelProto, helper

from onnxcut.attribution.probe import Head, feature_axis
from onnxcut.errors import DataError, RuntimeMissingError
from onnxcut.grad import GradientSession
from onnxcut.graph.io import GraphIndex, expose_tensors
from onnxcut.graph.shapes import graph_inputs, infer_shapes
from onnxcut.runtime import session

OBJECTIVES = ("logit", "logprob")


def _with_log_softmax(model: ModelProto, score: str, axis: int) -> tuple[ModelProto, str]:
    """Append LogSoftmax(score) along the category axis; return the model and its tensor."""
    new = ModelProto()
    new.CopyFrom(model)
    name = f"{score}/onnxcut_log_softmax"
    new.graph.node.append(
        helper.make_node("LogSoftmax", [score], [name], axis=axis, name="onnxcut_log_softmax")
    )
    return infer_shapes(new), name


class GradientRunner:
    """Activations and gradients of the probed feature maps for a batch of images."""

    def __init__(
        self,
        model: ModelProto,
        head: Head,
        layers: dict[str, str],
        *,
        provider: str = "cpu",
        threads: int | None = None,
        backend: str = "symbolic",
        extra: list[str] | None = None,
        objective: str = "logit",
    ):
        if objective not in OBJECTIVES:
            raise DataError(f"--objective '{objective}': use one of {', '.join(OBJECTIVES)}")
        if backend not in ("symbolic", "ort-training"):
            raise DataError(
                f"--grad {backend}: attribution needs positive-part gradient sums, which "
                "finite differences cannot give (only signed channel sums, see "
                "onnxcut.channel_sums); use --grad symbolic or ort-training"
            )
        self.backend = backend
        self.head = head
        self.layers = list(layers)
        self.features = dict(layers)
        index = GraphIndex(model)
        self.axes = {name: feature_axis(index, name) for name in layers}  # channel axis
        score = [head.score] if head.score != head.output else []
        self.extra = [t for t in dict.fromkeys(extra or []) if t not in (head.output, head.score)]
        self.forward_names = [head.output, *score]
        self.input_name = graph_inputs(model)[0].name
        target = head.score
        if objective == "logprob":
            # log softmax_k credits channels that push the competing categories down too.
            model, target = _with_log_softmax(model, head.score, head.axis)
        if backend == "ort-training":
            from onnxcut.grad.orttraining import _INSTALL, available

            if not available():
                raise RuntimeMissingError(_INSTALL)
            # onnxruntime-training bakes the objective into its graph: one build per category.
            self.model, self.target = model, target
            self.forward_session = session(
                expose_tensors(model, score + self.extra), provider, threads
            )
            self.feature_session = session(
                expose_tensors(model, list(layers.values())), provider, threads
            )
            return
        # Split in two halves: the forward half, run once per image, also gives the
        # probabilities that decide the masks; the backward half then needs only the masks.
        self.grad = GradientSession(
            model,
            list(layers.values()),
            target,
            head.axis,
            provider=provider,
            threads=threads,
            forward_outputs=self.forward_names + self.extra,
        )
        self._last: tuple[np.ndarray, dict] | None = None

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, dict]:
        """Return (score tensor, probabilities output or None, extra tensors) for a batch."""
        if self.backend == "symbolic":
            values = self.grad.forward({self.input_name: x})
            self._last = (x, values)  # gradients(x, ...) reuses this forward pass
            outs = [values[n] for n in self.forward_names + self.extra]
        else:
            outs = self.forward_session.run(self.forward_names + self.extra, {self.input_name: x})
        extras = dict(zip(self.extra, outs[len(self.forward_names) :], strict=True))
        if len(self.forward_names) == 2:
            return outs[1], outs[0], extras
        return outs[0], None, extras

    def gradients(self, x: np.ndarray, categories: np.ndarray, masks: np.ndarray):
        """Activations {layer: (N, C, ...)} and gradients {layer: (P, N, C, ...)} of a batch.

        `categories` (P, N) give slot p of image n its category; `masks` (P, N, ...) weight
        its score (the output's shape without the category axis; zeros leave a slot unused).
        """
        if self.backend == "ort-training":
            return self._ort_gradients(x, categories[:, 0], masks[:, 0])
        feeds = {self.input_name: x}
        values = self._last[1] if self._last and self._last[0] is x else self.grad.forward(feeds)
        weights = list(masks.astype(np.float32))
        result = self.grad.backward(feeds, values, categories, weights)
        acts = {name: result.activations[t] for name, t in self.features.items()}
        grads = {name: result.gradients[t] for name, t in self.features.items()}
        return acts, grads

    def _ort_gradients(self, x: np.ndarray, categories: np.ndarray, weights: np.ndarray):
        """One image (N = 1): onnxruntime-training builds one graph per category."""
        from onnxcut.grad.orttraining import ort_gradients

        feeds = {self.input_name: x}
        feats = list(self.features.values())
        values = self.feature_session.run(feats, feeds)
        acts = dict(zip(self.layers, values, strict=True))
        per_k = [
            ort_gradients(
                self.model,
                feeds,
                feats,
                self.target,
                int(k),
                self.head.axis,
                weights[i] if self.head.spatial else None,
            )
            for i, k in enumerate(categories)
        ]
        grads = {name: np.stack([g[t] for g in per_k]) for name, t in self.features.items()}
        return acts, grads
