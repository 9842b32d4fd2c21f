"""The plan: which channels to keep, as JSON, and its validation against a model.

    {"format": "onnxcut.plan/1", "model_sha256": "<optional>",
     "keep": {"<producer node>": [kept channel indices]},
     "outputs": {"<graph output>": {"axis": 1, "keep": [indices]}}}

Naming one producer of a channel group sets the kept channels of the whole group; the
`outputs` section cuts the channels of a graph output (the head's categories). An optional
`compensation` section, {"<Conv or Gemm node>": [one bias delta per output channel]}, is
added to those nodes' biases before the cut, by `extract` and `mask` alike.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnxcut.channels.deps import ChannelTrace
from onnxcut.errors import PlanError

FORMAT = "onnxcut.plan/1"
_KEYS = ("format", "model_sha256", "keep", "outputs", "selection", "compensation")


@dataclass(frozen=True)
class OutputKeep:
    """The channels of one graph output to keep, on `axis`."""

    keep: tuple[int, ...]
    axis: int = 1


@dataclass(frozen=True)
class Plan:
    keep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: dict[str, OutputKeep] = field(default_factory=dict)
    model_sha256: str | None = None
    selection: dict[str, Any] = field(default_factory=dict)  # how it was chosen (budget, ...)
    compensation: dict[str, tuple[float, ...]] = field(default_factory=dict)  # bias deltas

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT}
        if self.model_sha256:
            data["model_sha256"] = self.model_sha256
        data["keep"] = {k: list(v) for k, v in self.keep.items()}
        data["outputs"] = {
            k: {"axis": o.axis, "keep": list(o.keep)} for k, o in self.outputs.items()
        }
        if self.selection:
            data["selection"] = dict(self.selection)
        if self.compensation:
            data["compensation"] = {k: list(v) for k, v in self.compensation.items()}
        return data

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


PlanLike = Plan | Mapping[str, Any] | str | os.PathLike[str]


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and check the structure of a plan file (its fit to a model is checked later)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the plan ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not valid JSON ({e}); fix the plan file") from None
    if isinstance(data, dict) and "format" not in data:
        raise PlanError(f'{path}: no \'format\' key; a plan starts with "format": "{FORMAT}"')
    return parse_plan(data, str(path))


def as_plan(plan: PlanLike) -> Plan:
    """Accept a Plan, a dict in the JSON layout, or a path to a plan file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Mapping):
        return parse_plan(plan, "plan")
    return load_plan(plan)


def parse_plan(data: Any, source: str = "plan") -> Plan:
    """Check a decoded plan's structure and return it as a Plan."""
    if not isinstance(data, Mapping):
        raise PlanError(f"{source}: a plan is a JSON object with 'format' and 'keep'")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise PlanError(f"{source}: unknown key '{unknown[0]}'; a plan has {', '.join(_KEYS)}")
    if data.get("format", FORMAT) != FORMAT:
        raise PlanError(f"{source}: format '{data['format']}' is not supported; use '{FORMAT}'")
    sha = data.get("model_sha256")
    if sha is not None and (not isinstance(sha, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", sha)):
        raise PlanError(f"{source}: model_sha256 must be 64 hex digits; fix or drop it")
    keep = _mapping(data.get("keep", {}), f"{source}: keep")
    outputs = _mapping(data.get("outputs", {}), f"{source}: outputs")
    parsed_outputs = {}
    for name, entry in outputs.items():
        where = f"{source}: outputs['{name}']"
        if not isinstance(entry, Mapping) or set(entry) - {"axis", "keep"} or "keep" not in entry:
            raise PlanError(f'{where} must be an object {{"axis": 1, "keep": [indices]}}')
        axis = entry.get("axis", 1)
        if not isinstance(axis, int) or isinstance(axis, bool) or axis < 0:
            raise PlanError(f"{where}: axis must be a non-negative integer")
        parsed_outputs[name] = OutputKeep(_indices(entry["keep"], where), axis)
    selection = _mapping(data.get("selection", {}), f"{source}: selection")
    compensation = _mapping(data.get("compensation", {}), f"{source}: compensation")
    return Plan(
        {k: _indices(v, f"{source}: keep['{k}']") for k, v in keep.items()},
        parsed_outputs,
        sha.lower() if sha else None,
        dict(selection),
        {k: _numbers(v, f"{source}: compensation['{k}']") for k, v in compensation.items()},
    )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a JSON object keyed by name")
    return value


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    ok = isinstance(value, list | tuple) and all(
        isinstance(v, int | float | np.number) and not isinstance(v, bool) and np.isfinite(v)
        for v in value
    )
    if not ok or not value:
        raise PlanError(f"{where} must be a non-empty list of finite numbers (bias deltas)")
    return tuple(float(v) for v in value)


def _indices(value: Any, where: str) -> tuple[int, ...]:
    ok = isinstance(value, list | tuple) and all(
        isinstance(i, int | np.integer) and not isinstance(i, bool) for i in value
    )
    if not ok:
        raise PlanError(f"{where} must be a list of channel indices (integers)")
    if not value:
        raise PlanError(f"{where} is empty; keep at least one channel or remove the entry")
    if min(value) < 0:
        raise PlanError(f"{where}: index {min(value)} is negative; indices start at 0")
    if len(set(value)) != len(value):
        dup = next(i for i in value if list(value).count(i) > 1)
        raise PlanError(f"{where} lists channel {dup} twice; list each channel once")
    return tuple(int(i) for i in value)


def check_model_sha(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Raise PlanError when the plan names another model file's sha256 than `path`'s."""
    from onnxcut.graph.io import sha256

    if plan.model_sha256 and Path(path).is_file():
        _check_sha(plan, sha256(path))


def _check_sha(plan: Plan, model_sha256: str | None) -> None:
    if plan.model_sha256 and model_sha256 and plan.model_sha256 != model_sha256:
        raise PlanError(
            f"plan model_sha256 {plan.model_sha256[:12]}... is not this model's "
            f"({model_sha256[:12]}...); the plan was made for another model: re-create it "
            "or drop model_sha256"
        )


def resolve(plan: Plan, trace: ChannelTrace, model_sha256: str | None = None) -> np.ndarray:
    """Check a plan against a traced model; return which channel classes are kept.

    Returns: (classes,) bool. Raises PlanError, one line naming what is wrong.
    """
    _check_sha(plan, model_sha256)
    n_classes = len(trace.class_group)
    state = np.zeros(n_classes, dtype=np.int8)  # 0 unset, 1 kept, -1 removed
    owner: list[tuple[str, int] | None] = [None] * n_classes
    customised = set()
    for name, keep in plan.keep.items():
        slots = _producer_slots(trace, name, keep)
        group = trace.group_of(name)
        if group.reason is not None:
            raise PlanError(f"keep['{name}']: group {group.id} is frozen: {group.reason}")
        _assign(state, owner, trace.slot_class[slots], keep, f"keep['{name}']")
    for name, entry in plan.outputs.items():
        cmap = trace.maps.get(name)
        if name not in trace.index.outputs:
            raise PlanError(
                f"outputs names '{name}', which is not a graph output; "
                f"outputs: {', '.join(trace.index.outputs)}"
            )
        if cmap is None:
            raise PlanError(
                f"outputs['{name}']: its channels are not traced to a parameter layer (an op "
                "such as Softmax mixes them); cut the logits before it, or drop the entry"
            )
        if entry.axis != cmap.axis:
            raise PlanError(
                f"outputs['{name}']: axis {entry.axis} given, its channels are on axis {cmap.axis}"
            )
        if max(entry.keep) >= len(cmap.slots):
            raise PlanError(
                f"outputs['{name}']: channel {max(entry.keep)} out of range; "
                f"'{name}' has {len(cmap.slots)} channels (0..{len(cmap.slots) - 1})"
            )
        classes = trace.slot_class[cmap.slots]
        for g_id in np.unique(trace.class_group[classes]).tolist():
            reason = trace.groups[g_id].reason if g_id >= 0 else None
            if reason is not None:
                raise PlanError(f"outputs['{name}']: group {g_id} is frozen: {reason}")
        _assign(state, owner, classes, entry.keep, f"outputs['{name}']")
        customised.add(name)
    _check_outputs(trace, state, owner, customised)
    kept = state >= 0
    _check_nonempty(trace, kept)
    return kept


def _producer_slots(trace: ChannelTrace, name: str, keep: tuple[int, ...]) -> np.ndarray:
    if name not in trace.producer_slots:
        node = trace.index.nodes.get(name)
        if node is None:
            known = list(trace.producer_slots)
            shown = ", ".join(known[:6]) + (", ..." if len(known) > 6 else "")
            raise PlanError(
                f"keep names node '{name}', which is not in the model; producers: {shown} "
                "(see onnxcut inspect)"
            )
        raise PlanError(
            f"keep['{name}']: node '{name}' ({node.op_type}) owns no channels; name the Conv, "
            "ConvTranspose, Gemm or MatMul that produces them"
        )
    slots = trace.producer_slots[name]
    if max(keep) >= len(slots):
        raise PlanError(
            f"keep['{name}']: channel {max(keep)} out of range; '{name}' has {len(slots)} "
            f"output channels (0..{len(slots) - 1})"
        )
    return slots


def _assign(state, owner, classes: np.ndarray, keep: tuple[int, ...], label: str) -> None:
    wanted = np.full(len(classes), -1, dtype=np.int8)
    wanted[list(keep)] = 1
    for pos, (c, want) in enumerate(zip(classes.tolist(), wanted.tolist(), strict=True)):
        if state[c] == 0:
            state[c], owner[c] = want, (label, pos)
        elif state[c] != want:
            first, first_pos = owner[c]
            (k_label, k_pos), (d_label, d_pos) = (
                ((label, pos), (first, first_pos))
                if want > 0
                else ((first, first_pos), (label, pos))
            )
            who = label if first == label else f"{first} and {label}"
            raise PlanError(
                f"{who} disagree: channel {k_pos} of {k_label} is kept but the coupled channel "
                f"{d_pos} of {d_label} is not; give coupled producers the same channels, or "
                "name only one of them"
            )


def _check_outputs(trace: ChannelTrace, state, owner, customised: set[str]) -> None:
    """A graph output that the plan changes must be named in the outputs section."""
    for name in trace.index.outputs:
        cmap = trace.maps.get(name)
        if cmap is None or name in customised:
            continue
        classes = trace.slot_class[cmap.slots]
        removed = classes[state[classes] < 0]
        if len(removed):
            label = owner[int(removed[0])][0]
            raise PlanError(
                f"{label} removes channels of graph output '{name}'; add '{name}' to the "
                "plan's outputs section to cut it, or keep those channels"
            )


def _check_nonempty(trace: ChannelTrace, kept: np.ndarray) -> None:
    for name, cmap in trace.maps.items():
        if not kept[trace.slot_class[cmap.slots]].any():
            producer = trace.index.producer.get(name)
            where = f"output of '{producer.name}' ({producer.op_type})" if producer else "input"
            what = "graph output" if name in trace.index.outputs else "tensor"
            raise PlanError(
                f"the plan leaves {what} '{name}' ({where}) with no channel; keep at least "
                "one of the channels it carries"
            )
