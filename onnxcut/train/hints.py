"""Feature hints (FitNets, Romero et al. 2015) for distill: which tensors of a sub-network
are matched to its original's, and at which channels.

`extract` records, for every layer's data input, the original channels the cut keeps
(`onnxcut.kept`). A hint pairs such a student tensor with the teacher's tensor of the same
name at those channels; the loss adds each one's relative squared error (losses.hint). A
tensor only hints where a trained parameter computes it and the output loss reads it.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from onnx import ModelProto, TensorProto

from onnxcut.channels.surgery import KEPT_KEY, read_kept
from onnxcut.errors import ModelError
from onnxcut.graph.io import GraphIndex
from onnxcut.graph.shapes import infer_shapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hint:
    """A student tensor's match in the teacher: the same name, these channels on `axis`."""

    axis: int
    channels: tuple[int, ...]
    rank: int
    width: int  # the teacher tensor's channel count on `axis`


def match_hints(
    s: ModelProto,
    t: ModelProto,
    params: Sequence[str],
    logits: str,
    patterns: Sequence[str] = (),
) -> dict[str, Hint]:
    """The student's feature hints: each tensor its `onnxcut.kept` metadata matches to the
    teacher's tensor of the same name, that a trained parameter computes and the loss reads;
    with `patterns` (globs over tensor names), only the tensors one of them matches."""
    kept = read_kept(s)
    if not kept:
        raise ModelError(
            f"the student has no {KEPT_KEY} metadata to match its features to the teacher's; "
            "make it with onnxcut extract, or drop --hints"
        )
    si, ti = GraphIndex(s), GraphIndex(infer_shapes(t))
    trained, read = si.descendants(params), si.ancestors([logits])
    hints = {}
    for name, (axis, channels) in kept.items():
        mine, theirs = si.shape(name), ti.shape(name)
        if name not in trained or name not in read or mine is None or theirs is None:
            continue
        rank = len(mine)
        axis %= rank
        count = theirs[axis] if len(theirs) == rank else None
        if not isinstance(count, int) or count <= max(channels, default=-1):
            continue
        if mine[axis] == len(channels) and si.dtype(name) in (None, TensorProto.FLOAT):
            hints[name] = Hint(axis, tuple(channels), rank, count)
    if not hints:
        raise ModelError(
            f"none of the student's {KEPT_KEY} tensors matches a tensor of the teacher; pass "
            "the model the student was cut from as --teacher, or drop --hints"
        )
    if patterns:
        chosen = {
            n: h for n, h in hints.items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)
        }
        if not chosen:
            names = ", ".join(list(hints)[:3])
            raise ModelError(
                f"--hints-at {' '.join(patterns)} matches none of the student's {len(hints)} "
                f"hint tensors (e.g. {names}); see them with onnxcut inspect"
            )
        hints = chosen
    log.info("feature hints at %d tensors", len(hints))
    return hints
