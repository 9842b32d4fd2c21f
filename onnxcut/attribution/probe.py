"""What attribution looks at: the category output, its probabilities, and the probed layers.

A probed layer is named by its producer node (Conv/ConvTranspose/Gemm), as plans are; its
feature map is the tensor after the channel-wise chain that follows it (BatchNormalization and
activations), the paper's "feature map", so activations are post-nonlinearity where the
graph allows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import ModelProto

from onnxcut.errors import DataError, ModelError
from onnxcut.graph.io import FLOAT_TYPES, GraphIndex

PROBE_OPS = ("Conv", "ConvTranspose")
# Channel-last MatMuls with a constant weight are 1x1 convolutions written as Linear layers
# (ConvNeXt's MLPs): probed too, along their last axis. 2-D Gemm/MatMul heads are probed
# only when --layers names them.
_FEATURE_AXIS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1}
# Ops that map each channel to itself one-to-one: a feature map extends through them.
CHANNELWISE_CHAIN = frozenset(
    {
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Clip",
        "HardSwish",
        "Elu",
        "Selu",
        "Celu",
        "Softplus",
        "Mish",
        "Gelu",
        "Tanh",
        "Sigmoid",
        "HardSigmoid",
        "Identity",
        "Dropout",
    }
)
PROB_OPS = {"Softmax": "softmax", "Sigmoid": "sigmoid"}
CATEGORIES_KEY = "onnxcut.categories"  # output -> original category of each channel


@dataclass(frozen=True)
class Head:
    output: str  # graph output holding the categories
    score: str  # tensor the objective differentiates (logits before a Softmax/Sigmoid)
    axis: int  # category axis, non-negative
    probs: str  # how probabilities come from `score`: softmax, sigmoid or identity
    n_categories: int
    spatial: bool  # rank 4 output: segmentation


def find_head(
    model: ModelProto, output: str | None = None, axis: int | None = None, probs: str | None = None
) -> Head:
    """Pick the category output (the single float output with a category axis by default)."""
    index = GraphIndex(model)
    candidates = [o for o in index.outputs if index.dtype(o) in FLOAT_TYPES]
    if output is None:
        ranked = [o for o in candidates if len(index.shape(o) or []) in (2, 4)]
        if len(ranked) != 1:
            raise ModelError(
                f"{len(ranked)} float outputs of rank 2 or 4 ({', '.join(ranked) or 'none'}); "
                "pick the category output with --output NAME"
            )
        output = ranked[0]
    elif output not in index.outputs and output not in index.producer:
        raise ModelError(
            f"--output '{output}' is not a tensor of the model; outputs: {', '.join(index.outputs)}"
        )
    shape = index.shape(output)
    if shape is None:
        raise ModelError(f"output '{output}' has no known shape; pass --input-shape")
    rank = len(shape)
    axis = 1 if axis is None else axis
    if not -rank <= axis < rank:
        raise ModelError(f"--category-axis {axis} is out of range for '{output}' (rank {rank})")
    axis %= rank
    k = shape[axis]
    if not isinstance(k, int) or k <= 0:
        raise ModelError(
            f"output '{output}' has a dynamic category axis {axis}; pass "
            "--input-shape or --category-axis"
        )
    producer = index.producer.get(output)
    score, detected = output, None
    if producer is not None and producer.op_type in PROB_OPS:
        score, detected = producer.input[0], PROB_OPS[producer.op_type]
    if probs is None:
        probs = "identity" if detected else ("sigmoid" if k == 1 else "softmax")
    elif detected:
        score = output  # an explicit --probs means: treat the output itself as the scores
    if probs not in ("softmax", "sigmoid", "identity"):
        raise ModelError(f"--probs '{probs}': use softmax, sigmoid or identity")
    return Head(output, score, axis, probs, k, rank == 4)


def output_categories(model: ModelProto, head: Head) -> list[int] | None:
    """Original category of each output channel, from `onnxcut.categories`, or None.

    An assembled model records [part, original category] pairs; the category is the name.
    """
    meta = {p.key: p.value for p in model.metadata_props}
    if CATEGORIES_KEY not in meta:
        return None
    mapping = json.loads(meta[CATEGORIES_KEY])
    cats = mapping.get(head.output)
    if cats is None or len(cats) != head.n_categories:
        raise DataError(
            f"metadata {CATEGORIES_KEY} does not describe output '{head.output}' "
            f"({head.n_categories} channels); re-extract the model"
        )
    return [int(c[1]) if isinstance(c, list) else int(c) for c in cats]


def output_origins(model: ModelProto, head: Head) -> list | None:
    """The raw `onnxcut.categories` entries of the category output (pairs when assembled)."""
    meta = {p.key: p.value for p in model.metadata_props}
    return json.loads(meta[CATEGORIES_KEY]).get(head.output) if CATEGORIES_KEY in meta else None


def probabilities(scores: np.ndarray, head: Head, outputs: np.ndarray | None = None) -> np.ndarray:
    """Category probabilities from the score tensor (or the output, when it holds them)."""
    if outputs is not None and head.score != head.output:
        return outputs
    if head.probs == "identity":
        return scores
    if head.probs == "sigmoid":
        return 1.0 / (1.0 + np.exp(-scores))
    shifted = scores - scores.max(axis=head.axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=head.axis, keepdims=True)


def feature_tensor(index: GraphIndex, node_name: str) -> str:
    """Follow a producer's output through its single-consumer channel-wise chain."""
    tensor = index.nodes[node_name].output[0]
    while True:
        consumers = index.consumers.get(tensor, [])
        if len(consumers) != 1 or tensor in index.outputs:
            return tensor
        nxt = consumers[0]
        if nxt.op_type not in CHANNELWISE_CHAIN or nxt.input[0] != tensor:
            return tensor
        if nxt.op_type == "Dropout" or len(nxt.output) != 1:
            return tensor
        tensor = nxt.output[0]


def probe_layers(
    model: ModelProto, names: Sequence[str] | None = None, head: Head | None = None
) -> dict[str, str]:
    """Return {producer node name: feature tensor} for the probed layers, in graph order."""
    index = GraphIndex(model)
    convs = [
        n.name
        for n in model.graph.node
        if n.op_type in PROBE_OPS or (n.op_type == "MatMul" and _linear_on_maps(index, n))
    ]
    if names:
        unknown = [n for n in names if n not in index.nodes]
        if unknown:
            raise DataError(
                f"--layers names unknown node(s) {', '.join(unknown[:3])}; "
                "list the layers with onnxcut inspect"
            )
        convs = [n for n in convs if n in set(names)] + [
            n for n in names if n not in convs and index.nodes[n].op_type in ("Gemm", "MatMul")
        ]
    if not convs:
        raise ModelError("no Conv or ConvTranspose layer to probe; pass a CNN or --layers")
    layers = {name: feature_tensor(index, name) for name in convs}
    if head is not None:
        # The score itself is not a feature map: probing it would only echo the objective.
        layers = {k: v for k, v in layers.items() if v not in (head.score, head.output)}
    for name, tensor in layers.items():
        shape = index.shape(tensor)
        if shape is None or not isinstance(shape[feature_axis(index, name)], int):
            raise ModelError(
                f"layer '{name}': feature '{tensor}' has no static channel count; "
                "pass --input-shape"
            )
    return layers


def _linear_on_maps(index: GraphIndex, node) -> bool:
    out = index.shape(node.output[0])
    return out is not None and len(out) >= 3 and index.const(node.input[1]) is not None


def feature_axis(index: GraphIndex, name: str) -> int:
    """The channel axis of a probed layer's output: 1, or the last for a MatMul."""
    node = index.nodes[name]
    if node.op_type == "MatMul":
        return len(index.shape(node.output[0]) or [0, 0]) - 1
    return _FEATURE_AXIS.get(node.op_type, 1)


def channel_counts(model: ModelProto, layers: dict[str, str]) -> dict[str, int]:
    index = GraphIndex(model)
    return {name: int(index.shape(t)[feature_axis(index, name)]) for name, t in layers.items()}


def resize_masks(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (..., H, W) masks to (..., h, w), by index arrays."""
    h, w = masks.shape[-2:]
    if (h, w) == tuple(size):
        return masks
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return masks[..., rows[:, None], cols[None, :]]
