"""One exception hierarchy: every user-facing failure is an OnnxcutError.

The CLI prints an OnnxcutError as one line with exit code 2. Anything else is a bug and keeps
its traceback, so broken invariants are `assert`s, never OnnxcutErrors.
"""

from __future__ import annotations

from typing import Any


class OnnxcutError(Exception):
    """User-facing failure; the CLI prints it without a traceback."""


class ModelError(OnnxcutError):
    """The model file cannot be read, or does not hold what a command needs."""


class BatchError(ModelError):
    """K categories cannot share one backward batch; callers fall back to one at a time."""


class DataError(OnnxcutError):
    """Images, masks, scores or plans that are missing, corrupt or inconsistent."""


class PlanError(OnnxcutError):
    """A plan that does not fit the model it is applied to."""


class RuntimeMissingError(OnnxcutError):
    """onnxruntime (or an optional backend) is not installed."""


class OutputError(OnnxcutError):
    """An output path that cannot be written."""


class TrainError(OnnxcutError):
    """Training cannot go on: a diverged loss, a resume that does not match its run."""


class UnsupportedOpError(OnnxcutError):
    """A node whose op a pass has no rule for."""

    def __init__(self, node: Any, reason: str):
        super().__init__(f"node '{node.name}' ({node.op_type}): {reason}")
        self.node_name = node.name
        self.op = node.op_type


def first_line(error: BaseException) -> str:
    """A foreign error's message in one line (onnxruntime's, the ONNX checker's, ...: their
    messages run on over many), or its type where it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
