"""The report's sections, each from checked inputs to HTML fragments and figures."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxcut.report import figures, measures
from onnxcut.report.html import Picture, Section, details, esc, figure, note, slug, table
from onnxcut.report.inputs import EVAL_METRIC, Inputs
from onnxcut.report.route import route_graph

_EVAL_ROWS = {
    "miou": "mIoU",
    "miou_classes": "mIoU of the chosen classes",
    "top1": "top-1",
    "pixel_accuracy": "pixel accuracy",
    "classes": "chosen classes",
    "images": "images",
    "params": "params",
    "flops": "FLOPs (MACs)",
    "latency_ms": "latency (ms)",
}


def _num(value: object, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.{digits}f}"


def header(inputs: Inputs) -> str:
    s = inputs.scores
    meta = s.meta
    if len(s.categories) <= 32:
        counts = ", ".join(f"{c}: {int(n)}" for c, n in zip(s.categories, s.count, strict=True))
    else:
        low, mid, high = np.percentile(s.count, [0, 50, 100])
        counts = f"{low:.0f} to {high:.0f}, median {mid:.0f}; {int((s.count == 0).sum())} with none"
    rows = [
        ("scores", inputs.scores_path),
        ("model", inputs.model_path or meta.get("model_path", "-")),
        ("task", f"{inputs.task} ({meta.get('objective', '-')} objective, tau {meta.get('tau')})"),
        ("images", f"{meta.get('images', '-')} ({meta.get('skipped', 0)} skipped)"),
        ("categories", f"{len(s.categories)}; images per category: {counts}"),
        ("probed layers", str(len(s.layers("forward")))),
    ]
    if inputs.plan_path:
        rows.append(("plan", inputs.plan_path))
    if inputs.sub_path:
        rows.append(("sub-network", inputs.sub_path))
    parts = [table(["input", "value"], rows)]
    parts += [note(n) for n in inputs.notes]
    return "".join(parts)


def separation(stats: Sequence[measures.LayerStats], labels: Sequence[str]) -> tuple:
    pic = Picture(
        "divergence",
        "divergence by depth",
        figures.divergence_figure(stats, labels),
        "Per probed layer, 1 minus the mean cosine similarity between the mean vectors of "
        "every two categories that contributed images: 0 where all categories use the same "
        "channels, higher where they use their own.",
    )
    rows = [
        (i, s.name, s.channels, *(_num(v, 3) for v in s.divergence.values()))
        for i, s in enumerate(stats)
    ]
    kinds = list(stats[0].divergence)
    text = figure(pic) + details(
        "divergence per layer", table(["depth", "layer", "channels", *kinds], rows)
    )
    return Section("separation", "Where categories separate", [text]), [pic]


def plan_section(inputs: Inputs, latency_runs: int, threads: int | None) -> tuple:
    plan = inputs.plan
    assert plan is not None
    parts: list[str] = []
    if inputs.model is not None:
        rows = measures.plan_rows(plan, inputs.model, inputs.scores.meta.get("model_sha256"))
    else:
        rows = measures.plan_rows_from_scores(plan, inputs.scores)
        parts.append(note("Without the model, only the probed layers are shown, none as frozen."))
    labels = measures.short_names([r.layer for r in rows])
    pic = Picture(
        "plan",
        "channels kept per layer",
        figures.plan_figure(rows, labels),
        "Grey: the layer's channels; blue: kept by the plan; orange, hatched: a frozen group "
        "(never cut, reasons below); green: a layer whose channels reach a graph output, "
        "cut through the plan's outputs section.",
    )
    parts.insert(0, figure(pic))
    frozen: dict[int | None, list[measures.PlanRow]] = {}
    for r in rows:
        if r.frozen is not None:
            frozen.setdefault(r.group, []).append(r)
    if frozen:
        parts.append("<h3>Frozen groups</h3>")
        parts.append(
            table(
                ["group", "layers", "channels", "reason"],
                [
                    (g, ", ".join(r.layer for r in rs), rs[0].total, rs[0].frozen)
                    for g, rs in frozen.items()
                ],
            )
        )
    parts.append(
        details(
            "kept channels per layer",
            table(
                ["layer", "group", "kept", "total", "share"],
                [
                    (r.layer, _num(r.group), r.kept, r.total, f"{r.kept / r.total:.1%}")
                    for r in rows
                ],
            ),
        )
    )
    parts.append(_sizes(inputs, latency_runs, threads))
    if plan.selection:
        parts.append(table(["selection", "value"], sorted(plan.selection.items())))
    return Section("plan", "Plan", parts), [pic]


def _sizes(inputs: Inputs, latency_runs: int, threads) -> str:
    """Params, FLOPs and (with a sub-network) latency, before and after."""
    before = measures.size(inputs.model) if inputs.model is not None else None
    after = None
    if inputs.sub is not None:
        after = measures.size(inputs.sub)
    elif inputs.model is not None and inputs.plan is not None:
        from onnxcut.channels.surgery import extract

        after = measures.size(extract(inputs.model, inputs.plan))
    if before is None and after is None:
        return note("Sizes need the model (--model) or the sub-network (--sub).")
    rows = []
    for key, what in (("params", "params"), ("flops", "FLOPs (MACs)")):
        b = before[key] if before else None
        a = after[key] if after else None
        ratio = f"{a / b:.1%}" if a is not None and b else "-"
        rows.append((what, _num(b), _num(a), ratio))
    if inputs.sub is not None and inputs.model is not None:
        lb, la = measures.latency_ms([inputs.model, inputs.sub], latency_runs, threads)
        rows.append(("latency (ms)", f"{lb:.3f}", f"{la:.3f}", f"{la / lb:.1%}"))
    after_name = "sub-network" if inputs.sub is not None else "after the plan"
    text = table(["", "original", after_name, "kept"], rows)
    if inputs.sub is not None and inputs.model is not None:
        text += (
            f"<p>Latency: median of {latency_runs} batch-1 onnxruntime CPU runs each "
            f"({_threads(threads)}), the two models taking turns, measured while "
            "this report was built.</p>"
        )
    return "<h3>Size</h3>" + text


def _threads(threads: int | None) -> str:
    if not threads:
        return "onnxruntime's default threads"
    return "1 thread" if threads == 1 else f"{threads} threads"


def eval_section(inputs: Inputs) -> tuple:
    evals = inputs.evals
    metric = EVAL_METRIC[inputs.task]
    names = [Path(label).stem if Path(label).suffix else label for label, _ in evals]
    rows = []
    for key, label in _EVAL_ROWS.items():
        values = [e.get(key) for _, e in evals]
        if all(v is None for v in values):
            continue
        rows.append((label, *(_num(v, 4 if key != "latency_ms" else 3) for v in values)))
    classes = sorted({c for _, e in evals for c in e["per_class"]}, key=figures._natural)
    per_class = [(c, *(_num(e["per_class"].get(c)) for _, e in evals)) for c in classes]
    pic = Picture(
        "eval-per-class",
        "per-category quality",
        figures.eval_figure(list(zip(names, [e for _, e in evals], strict=True)), metric),
        "From the onnxcut eval --json reports given with --eval.",
    )
    chosen = {tuple(e.get("classes") or ()) for _, e in evals}
    parts = [table(["", *names], rows)]
    if len(chosen) > 1:
        parts.append(note("The eval reports were made for different --classes; compare with care."))
    parts += [figure(pic), "<h3>Per category</h3>", table(["category", *names], per_class)]
    return Section("evaluation", "Evaluation", parts), [pic]


def route_section(inputs: Inputs, categories: Sequence[int], top: int, max_layers: int) -> tuple:
    s = inputs.scores
    parts, pics = [], []
    if inputs.model is None:
        parts.append(note("Without the model the routes show channels only, no edges."))
    for k in categories:
        name = s.categories[k]
        if s.count[k] == 0:
            parts.append(note(f"Category {name}: no image counted for it, so no route."))
            continue
        graph = route_graph(s, k, inputs.model, top, max_layers)
        pic = Picture(
            slug(f"route-{name}"),
            f"decision route of category {name}",
            figures.route_figure(graph, measures.short_names(graph.columns), name),
            f"Model LEGO route of category {esc(name)}: the {top} channels of highest mean "
            "relevance in each layer (label: channel index; size and colour: its share of "
            "the layer's relevance); edges: how much of a channel's relevance its positive "
            "weights route to each earlier shown channel.",
        )
        parts.append(figure(pic))
        pics.append(pic)
    return Section("routes", "Decision routes", parts), pics


def layer_sections(inputs: Inputs, stats: Sequence, max_channels: int) -> tuple:
    s = inputs.scores
    labels = measures.short_names([st.name for st in stats])
    parts, pics = [], []
    painters: dict[tuple[str, ...], figures.LayerPainter] = {}
    drawn = stats[0].categories
    names = [s.categories[c] for c in drawn]
    seen = s.count[drawn] > 0
    for i, (st, label) in enumerate(zip(stats, labels, strict=True)):
        shown = measures.shown_channels(list(st.vectors.values()), max_channels)
        kinds = tuple(st.vectors)
        if kinds not in painters:
            painters[kinds] = figures.LayerPainter(kinds, names)
        pic = Picture(
            slug(f"layer-{i:03d}-{label}"),
            f"layer {st.name}",
            painters[kinds].paint(st, shown, seen),
            f"Depth {i}: <code>{esc(st.name)}</code>, {st.channels} channels.",
        )
        parts.append(figure(pic))
        pics.append(pic)
    intro = (
        "<p>Per layer: each category's mean forward and backward vector over the channels "
        "(scaled by the channel count, so 1 is an even spread; grey rows: categories without "
        "images), and the cosine similarity of every two categories' vectors.</p>"
    )
    if len(drawn) < len(s.categories):
        intro += (
            f"<p>{len(drawn)} of {len(s.categories)} categories are drawn: the plan's and "
            "routed ones first, then those with the most images. Divergence counts all.</p>"
        )
    if any(st.channels > max_channels for st in stats):
        intro += (
            f"<p>Layers wider than {max_channels} channels show the {max_channels} channels "
            "with the highest peak over the drawn categories, in index order.</p>"
        )
    return Section("layers", "Layers", [intro, *parts]), pics
