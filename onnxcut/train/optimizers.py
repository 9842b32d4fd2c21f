"""Optimizer steps as ONNX ops, one entry an optimizer, so an update never leaves the
execution provider: each reads a parameter, its gradient and its state, and gives them new.

Per-step scalars (learning rate, Adam's bias corrections) are fed, not baked in; with
`warmup` steps the learning rate rises linearly to `lr` over the first ones (lr t / warmup
at step t), which keeps one short epoch at a high rate from collapsing a sub-network:
    adam  m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2
          p' = p - (lr / (1 - b1^t)) m' / (sqrt(v') / sqrt(1 - b2^t) + eps)     (PyTorch's Adam)
          spelled in 11 element-wise ops, not 13 (each a pass over every weight: 55 ms of a
          ResNet-18 step had gone to them): with h = (1 - b1) g the state is w = v / k,
          k = (1 - b2) / (1 - b1)^2, so w' = b2 w + h^2; and the step's constants fold into
          two fed scalars, p' = p - LR m' / (sqrt(w') + EPS) with
          LR = lr sqrt(1 - b2^t) / ((1 - b1^t) sqrt(k)) and EPS = eps sqrt(1 - b2^t) / sqrt(k).
    sgd   u' = mu u + g;  p' = p - lr u'                               (PyTorch's SGD, momentum)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from onnxcut.train.builder import PREFIX, Builder

LR = PREFIX + "lr"
EPSILON = PREFIX + "eps"  # adam: its eps, as the scaled state w needs it at step t


@dataclass(frozen=True)
class Optimizer:
    name: str = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    warmup: int = 0  # steps

    @property
    def states(self) -> tuple[str, ...]:
        return OPTIMIZERS[self.name].states

    def scalars(self, step: int) -> dict[str, float]:
        """Fed scalars for 1-based step `step`."""
        lr = self.lr * min(1.0, step / self.warmup) if self.warmup else self.lr
        if self.name == "adam":
            b1, b2 = self.betas
            root_k = math.sqrt(1 - b2) / (1 - b1)
            unbias = math.sqrt(1 - b2**step)
            return {
                LR: lr * unbias / ((1 - b1**step) * root_k),
                EPSILON: self.eps * unbias / root_k,
            }
        return {LR: lr}


@dataclass(frozen=True)
class Rule:
    states: tuple[str, ...]
    emit: Callable[[Builder, Optimizer, str, str, dict[str, str], str, dict[str, str]], None]


def _adam(b: Builder, o: Optimizer, p: str, g: str, state, new_p: str, new_state) -> None:
    b1, b2 = o.betas
    h = b.op("Mul", [g, b.scalar(1 - b1)])
    m = b.op("Add", [b.op("Mul", [state["m"], b.scalar(b1)]), h], new_state["m"])
    w = b.op("Add", [b.op("Mul", [state["w"], b.scalar(b2)]), b.op("Mul", [h, h])], new_state["w"])
    denom = b.op("Add", [b.op("Sqrt", [w]), EPSILON])
    b.op("Sub", [p, b.op("Mul", [b.op("Div", [m, denom]), LR])], new_p)


def _sgd(b: Builder, o: Optimizer, p: str, g: str, state, new_p: str, new_state) -> None:
    u = b.op("Add", [b.op("Mul", [state["u"], b.scalar(o.momentum)]), g], new_state["u"])
    b.op("Sub", [p, b.op("Mul", [u, LR])], new_p)


OPTIMIZERS: dict[str, Rule] = {
    "adam": Rule(("m", "w"), _adam),
    "sgd": Rule(("u",), _sgd),
}
