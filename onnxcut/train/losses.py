"""Distillation losses: the loss value and its gradient w.r.t. the student's logits, as ONNX
ops, one entry a kind of category head.

Every loss reads the student logits z, the teacher's target p (already restricted to the
student's categories, tempered and normalised), per-image weights w (0 for the rows padding a
short last batch, broadcast over a position's axes) and a fed scalar `scale`, T / (real
positions), so every position of every batch weighs the same (w is left out below):
    softmax  L = T^2 / n sum p (log p - log softmax(z / T))    dL/dz = scale (softmax(z/T) - p)
    sigmoid  L = T^2 / n sum BCE(sigmoid(z / T), p)            dL/dz = scale (sigmoid(z/T) - p)
Feature hints (FitNets), at student tensors f_i whose kept channels are teacher tensors t_i,
with h hints, weight `lambda` and fed `hint_scale_i` = lambda / (h E_i):
    L += sum_i hint_scale_i sum w (f_i - t_i)^2             dL/df_i = 2 hint_scale_i w (f_i - t_i)
E_i is the energy (sum of squares over the batch's real rows) of the teacher's whole tensor
times the kept share of its channels, floored at an RMS of 1e-3 (teacher.FLOOR), so each
hint is a relative squared error whatever the layer's scale, and a kept set that is dead on
a batch, or a layer near zero, does not blow it up.
With labels (softmax heads), r is the one-hot label map, zero where unlabeled, and
`label_scale` = weight / labelled positions:
    L += -label_scale sum r log softmax(z)        dL/dz += label_scale (softmax(z) sum_k r - r)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from onnxcut.train.builder import PREFIX, Builder

TARGET = PREFIX + "target"
SCALE = PREFIX + "scale"
LABELS = PREFIX + "labels"
LABEL_SCALE = PREFIX + "label_scale"


def hint_target(tensor: str) -> str:
    """The fed teacher feature (kept channels) a student tensor is matched to."""
    return f"{PREFIX}hint/{tensor}"


def hint_scale(tensor: str) -> str:
    return f"{PREFIX}hint_scale/{tensor}"


@dataclass(frozen=True)
class LossTerms:
    loss: str  # scalar
    seed: str  # dL/dz, shaped like z


LossFn = Callable[[Builder, str, int, float, str], LossTerms]
LOSSES: dict[str, LossFn] = {}


def loss(kind: str) -> Callable[[LossFn], LossFn]:
    def register(fn: LossFn) -> LossFn:
        assert kind not in LOSSES, f"duplicate loss {kind}"
        LOSSES[kind] = fn
        return fn

    return register


def _total(b: Builder, per_position: str, factor: str, rows: str) -> str:
    weighted = b.op("Mul", [per_position, rows])
    return b.op("Mul", [b.op("ReduceSum", [weighted], keepdims=0), factor])


def softmax_pair(b: Builder, z: str, axis: int) -> tuple[str, str]:
    """softmax(z) and log softmax(z) over `axis`, from one shifted exponential.

    Element-wise ops and two reductions: onnxruntime's Softmax and LogSoftmax on an axis
    other than the last transpose around their kernel, 20x slower on a (16, 11, 64, 64)
    segmentation map.
    """
    shifted = b.op("Sub", [z, b.reduce("ReduceMax", z, [axis])])
    exp = b.op("Exp", [shifted])
    total = b.reduce("ReduceSum", exp, [axis])
    return b.op("Div", [exp, total]), b.op("Sub", [shifted, b.op("Log", [total])])


@loss("softmax")
def softmax_kl(b: Builder, z: str, axis: int, temperature: float, rows: str) -> LossTerms:
    tempered = b.op("Div", [z, b.scalar(temperature)])
    q, log_q = softmax_pair(b, tempered, axis)
    # p log p, with 0 log 0 = 0: p is floored inside the log only.
    log_p = b.op("Log", [b.op("Max", [TARGET, b.scalar(1e-30)])])
    kl = b.op("Mul", [TARGET, b.op("Sub", [log_p, log_q])])
    factor = b.op("Mul", [SCALE, b.scalar(temperature)])
    seed = b.op("Mul", [b.op("Mul", [b.op("Sub", [q, TARGET]), SCALE]), rows])
    return LossTerms(_total(b, kl, factor, rows), seed)


@loss("sigmoid")
def sigmoid_bce(b: Builder, z: str, axis: int, temperature: float, rows: str) -> LossTerms:
    tempered = b.op("Div", [z, b.scalar(temperature)])
    q = b.op("Sigmoid", [tempered])
    # BCE = softplus(t) - p t, stable for large |t|.
    bce = b.op("Sub", [b.op("Softplus", [tempered]), b.op("Mul", [TARGET, tempered])])
    factor = b.op("Mul", [SCALE, b.scalar(temperature)])
    seed = b.op("Mul", [b.op("Mul", [b.op("Sub", [q, TARGET]), SCALE]), rows])
    return LossTerms(_total(b, bce, factor, rows), seed)


def with_labels(b: Builder, terms: LossTerms, z: str, axis: int, rows: str) -> LossTerms:
    """Add the label cross-entropy (softmax heads) to a distillation loss; padding rows
    carry no labels, so `rows` only has to weigh the total."""
    q, log_q = softmax_pair(b, z, axis)
    labelled = b.reduce("ReduceSum", LABELS, [axis])
    ce = b.op("Neg", [b.op("Mul", [LABELS, log_q])])
    seed = b.op("Mul", [b.op("Sub", [b.op("Mul", [q, labelled]), LABELS]), LABEL_SCALE])
    return LossTerms(
        b.op("Add", [terms.loss, _total(b, ce, LABEL_SCALE, rows)]),
        b.op("Add", [terms.seed, seed]),
    )


def hint(b: Builder, f: str, rows: str) -> LossTerms:
    """One feature hint: the loss term of student tensor `f` and its seed (dL/df); `rows`
    broadcasts the per-image weights over f's axes."""
    diff = b.op("Sub", [f, hint_target(f)])
    scale = hint_scale(f)
    weighted = b.op("Mul", [b.op("Mul", [diff, diff]), rows])
    loss = b.op("Mul", [b.op("ReduceSum", [weighted], keepdims=0), scale])
    return LossTerms(loss, b.op("Mul", [diff, b.op("Mul", [rows, b.op("Add", [scale, scale])])]))
