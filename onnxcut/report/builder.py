"""report(): read and check every input, draw every figure, then write the page (and PNGs)."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnxcut.attribution.scores import Scores
from onnxcut.channels.plan import PlanLike
from onnxcut.errors import DataError, OutputError
from onnxcut.report import measures, sections
from onnxcut.report.figures import require_matplotlib
from onnxcut.report.html import Picture, page
from onnxcut.report.inputs import Inputs, gather

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ReportOptions:
    plan: PlanLike | None = None
    model: PathLike | None = None  # default: the model path recorded in the scores
    sub: PathLike | None = None  # the extracted sub-network: its size and measured latency
    evals: Sequence[PathLike | tuple[str, Mapping[str, Any]]] = ()  # onnxcut eval --json
    png_dir: PathLike | None = None  # also write every figure there as its own PNG
    routes: tuple[int, ...] | None = None  # categories whose route to draw (classifiers)
    max_channels: int = 256  # wider layers show this many channels in their heat maps
    max_categories: int = 64  # with more, heat maps show the chosen and best-counted ones
    route_top: int = 6  # channels per layer in a route
    route_layers: int = 24  # layers nearest the output in a route
    latency_runs: int = 20
    threads: int | None = 1  # onnxruntime threads: one gives the steadiest comparison
    title: str | None = None


def report(
    scores: PathLike | Scores, out: PathLike, options: ReportOptions | None = None
) -> tuple[Path, list[Picture]]:
    """Write the HTML report of a scores file (and what the options add) to `out`.

    Returns the page's path and its figures. Bad inputs raise an OnnxcutError before any
    file is written.
    """
    opts = options or ReportOptions()
    require_matplotlib()
    out = Path(out)
    _check_output(out, opts.png_dir)
    started = time.perf_counter()
    inputs = gather(scores, opts.plan, opts.model, opts.sub, opts.evals)
    text, pictures = render(inputs, opts)
    if opts.png_dir is not None:
        folder = Path(opts.png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for pic in pictures:
            (folder / f"{pic.slug}.png").write_bytes(pic.png)
    _write_atomic(out, text)
    log.info(
        "%s: %d figures, %.1f MB, %.1f s",
        out,
        len(pictures),
        len(text) / 1e6,
        time.perf_counter() - started,
    )
    return out, pictures


def render(inputs: Inputs, opts: ReportOptions) -> tuple[str, list[Picture]]:
    """The page's HTML and its figures, in page order."""
    if opts.routes and not inputs.scores.layers("relevance"):
        raise DataError(
            f"--route: {inputs.scores_path} holds no relevance routes; they come from "
            "onnxcut attribute on a classifier"
        )
    routes = _routes(inputs, opts) if inputs.scores.layers("relevance") else ()
    chosen = (*_plan_categories(inputs), *routes)
    drawn = measures.shown_categories(inputs.scores, chosen, opts.max_categories)
    stats = measures.layer_stats(inputs.scores, drawn)
    labels = measures.short_names([s.name for s in stats])
    parts, pictures = [], []

    def add(built: tuple) -> None:
        parts.append(built[0])
        pictures.extend(built[1])

    add(sections.separation(stats, labels))
    if inputs.plan is not None:
        add(sections.plan_section(inputs, opts.latency_runs, opts.threads))
    elif inputs.sub is not None:
        inputs.notes.append("--sub is drawn with a plan only; pass --plan")
    if inputs.evals:
        add(sections.eval_section(inputs))
    if inputs.scores.layers("relevance"):
        add(
            sections.route_section(inputs, _routes(inputs, opts), opts.route_top, opts.route_layers)
        )
    add(sections.layer_sections(inputs, stats, opts.max_channels))
    model = Path(inputs.model_path or inputs.scores.meta.get("model_path") or "model").name
    title = opts.title or f"onnxcut report: {model}"
    return page(title, sections.header(inputs), parts), pictures


def _routes(inputs: Inputs, opts: ReportOptions) -> tuple[int, ...]:
    """The categories to route: as asked, else the plan's chosen classes, else the first."""
    k = len(inputs.scores.categories)
    if opts.routes is not None:
        bad = [c for c in opts.routes if not 0 <= c < k]
        if bad:
            raise DataError(f"--route {bad[0]} is out of range: the scores have {k} categories")
        return tuple(opts.routes)
    return _plan_categories(inputs)[:4] or (0,)


def _plan_categories(inputs: Inputs) -> tuple[int, ...]:
    """The categories a plan keeps in the head (for segmentation, background too)."""
    plan = inputs.plan
    if plan is None or not plan.outputs:
        return ()
    k = len(inputs.scores.categories)
    return tuple(c for c in next(iter(plan.outputs.values())).keep if c < k)


def _check_output(out: Path, png_dir: PathLike | None) -> None:
    if not out.parent.is_dir():
        raise OutputError(f"{out}: folder '{out.parent}' does not exist; create it first")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give a file name such as {out}/report.html")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: folder '{out.parent}' is not writable; choose another -o path")
    if png_dir is not None and Path(png_dir).exists() and not Path(png_dir).is_dir():
        raise OutputError(f"--png {png_dir}: exists and is not a folder; choose a folder")


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # a page to share: mkstemp made it owner-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
