"""The table of vector-Jacobian rules, one function per op, filled by the `@vjp` decorator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from onnxcut.grad.emitter import Emitter, Site

RuleFn = Callable[["Emitter", "Site"], Sequence["str | None"]]


class Rule(NamedTuple):
    fn: RuleFn
    # True where the rule returns gradients in the (broadcast) output shape, so the driver
    # reduces them to each input's shape.
    broadcast: bool


VJP_RULES: dict[str, Rule] = {}


def vjp(*ops: str, broadcast: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register a rule for ops; it returns one gradient (or None) per node input."""

    def register(fn: RuleFn) -> RuleFn:
        for op in ops:
            if op in VJP_RULES:
                raise ValueError(f"duplicate VJP rule for op '{op}'")
            VJP_RULES[op] = Rule(fn, broadcast)
        return fn

    return register


def supported_ops() -> list[str]:
    """Return the ops that have a rule, sorted."""
    return sorted(VJP_RULES)
