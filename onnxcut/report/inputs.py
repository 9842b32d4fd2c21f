"""What a report reads: a scores file and, optionally, a plan, models and eval reports.

Everything is read and checked here, before any figure is drawn or any file written, so a bad
input stops the report with one line and leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnx import ModelProto

from onnxcut.attribution.scores import Scores, load_scores
from onnxcut.channels.plan import Plan, PlanLike, as_plan
from onnxcut.errors import DataError, PlanError, first_line
from onnxcut.graph.io import load, sha256

log = logging.getLogger(__name__)

# The keys `onnxcut eval --json` writes, shared and by task.
EVAL_KEYS = ("task", "images", "per_class", "params", "flops", "latency_ms")
EVAL_TASK_KEYS = {"segment": ("miou", "pixel_accuracy"), "classify": ("top1",)}
EVAL_METRIC = {"segment": "miou", "classify": "top1"}

PathLike = str | os.PathLike[str]


@dataclass
class Inputs:
    scores: Scores
    scores_path: str
    plan: Plan | None = None
    plan_path: str | None = None
    model: ModelProto | None = None
    model_path: str | None = None
    sub: ModelProto | None = None
    sub_path: str | None = None
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # parts left out, and why

    @property
    def task(self) -> str:
        return str(self.scores.meta.get("task", "segment"))


def gather(
    scores: PathLike | Scores,
    plan: PlanLike | None = None,
    model: PathLike | None = None,
    sub: PathLike | None = None,
    evals: Sequence[PathLike | tuple[str, Mapping[str, Any]]] = (),
) -> Inputs:
    """Read and cross-check the report's inputs; raise an OnnxcutError on the first bad one."""
    if isinstance(scores, Scores):
        found = Inputs(scores, "scores")
    else:
        found = Inputs(load_scores(scores), str(scores))
    if not found.scores.layers("forward"):
        raise DataError(f"{found.scores_path}: holds no forward vectors; re-run attribute")
    sha = found.scores.meta.get("model_sha256")
    if plan is not None:
        found.plan = as_plan(plan)
        found.plan_path = str(plan) if isinstance(plan, str | os.PathLike) else "plan"
        if found.plan.model_sha256 and sha and found.plan.model_sha256 != sha:
            raise PlanError(
                f"{found.plan_path}: plan made for another model (sha256 "
                f"{found.plan.model_sha256[:12]}...) than {found.scores_path} ({sha[:12]}...); "
                "make the plan from these scores with onnxcut plan"
            )
    found.model, found.model_path = _model(found, model, sha)
    if sub is not None:
        if not Path(sub).is_file():
            raise DataError(
                f"--sub {sub}: no such file; pass the sub-network onnxcut extract wrote"
            )
        found.sub, found.sub_path = load(sub), str(sub)
    for item in evals:
        label, report = (
            (str(item[0]), item[1]) if isinstance(item, tuple) else (str(item), read_eval(item))
        )
        check_eval(report, label, found.task)
        found.evals.append((label, dict(report)))
    return found


def _model(found: Inputs, model: PathLike | None, sha: str | None):
    """The model the scores came from: --model, else the path recorded in the scores."""
    if model is not None:
        if not Path(model).is_file():
            raise DataError(f"--model {model}: no such file")
        if sha and sha256(model) != sha:
            raise DataError(
                f"--model {model}: not the model {found.scores_path} was made from (sha256 "
                f"{sha[:12]}...); pass that model or re-run attribute on this one"
            )
        return load(model), str(model)
    recorded = found.scores.meta.get("model_path")
    if recorded and Path(recorded).is_file() and (not sha or sha256(recorded) == sha):
        return load(recorded), str(recorded)
    why = (
        f"the model recorded in the scores ({recorded}) is missing or changed"
        if recorded
        else "the scores record no model"
    )
    found.notes.append(f"{why}; pass --model for frozen groups, sizes and route edges")
    log.warning("%s; pass --model to draw the parts that need it", why)
    return None, None


def read_eval(path: PathLike) -> dict[str, Any]:
    """Read one `onnxcut eval --json` file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"--eval {path}: no such file; write one with onnxcut eval --json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(
            f"--eval {path}: not a JSON eval report ({first_line(e)}); write one with onnxcut "
            "eval --json"
        ) from None
    return data


def check_eval(report: Any, label: str, task: str) -> None:
    """Refuse a JSON that is not an eval report of the scores' task."""
    kinds = ", ".join(EVAL_TASK_KEYS)
    if not isinstance(report, Mapping) or report.get("task") not in EVAL_TASK_KEYS:
        raise DataError(
            f"--eval {label}: not an onnxcut eval report (no 'task' of {kinds}); "
            "write one with onnxcut eval --json"
        )
    kind = report["task"]
    missing = [k for k in (*EVAL_KEYS, *EVAL_TASK_KEYS[kind]) if k not in report]
    if missing:
        raise DataError(
            f"--eval {label}: a {kind} eval report lacks '{missing[0]}'; "
            "write it with onnxcut eval --json"
        )
    if not isinstance(report["per_class"], Mapping) or not all(
        isinstance(v, int | float) for v in report["per_class"].values()
    ):
        raise DataError(f"--eval {label}: 'per_class' is not a table of numbers")
    if kind != task:
        raise DataError(
            f"--eval {label}: a {kind} eval report, but the scores come from a {task} run; "
            "pass eval reports of the same model and task"
        )
