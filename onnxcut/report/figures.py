"""The report's figures, drawn with matplotlib (the `report` extra) into PNG bytes.

matplotlib is imported inside `_new_figure` only, so `import onnxcut` works without it. Figures
are `matplotlib.figure.Figure` objects drawn by the Agg canvas, never pyplot's global state,
and are cleared once saved; all are 12 in wide at 100 dpi (1200 px) to read well at 1280 px.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxcut.errors import RuntimeMissingError
from onnxcut.report.measures import LayerStats, PlanRow
from onnxcut.report.route import RouteGraph

WIDTH = 12.0  # inches
DPI = 100
_LABELLED = 32  # at most this many categories get a tick label each
_TICKS = 40  # at most this many layer names along an axis
_KIND_COLOR = {"forward": "#1f77b4", "backward": "#d62728"}


def require_matplotlib() -> None:
    """Fail with one line naming the extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeMissingError(
            "matplotlib is not installed; the report draws its figures with it: "
            "install it with pip install 'onnxcut[report]'"
        ) from None


def _new_figure(height: float, layout: str | None = None):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(WIDTH, height), dpi=DPI, layout=layout)


def _cmap(name: str):
    """A colour map that draws NaN (categories without images) grey."""
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="#cccccc")


def _png(fig) -> bytes:
    """Draw a figure with Agg and encode it; its artists are dropped (no pyplot holds it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    data = _canvas_png(canvas)
    fig.clear()
    return data


def _category_ticks(ax, names: Sequence[str], axis: str = "y") -> None:
    if len(names) > _LABELLED:
        getattr(ax, f"set_{axis}ticks")([])
        getattr(ax, f"set_{axis}label")(f"{len(names)} categories", fontsize=8)
        return
    getattr(ax, f"set_{axis}ticks")(range(len(names)), list(names), fontsize=7)


def _layer_ticks(ax, labels: Sequence[str]) -> None:
    step = max(1, math.ceil(len(labels) / _TICKS))
    positions = list(range(0, len(labels), step))
    ax.set_xticks(positions, [labels[i] for i in positions], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(labels) - 0.4)


class LayerPainter:
    """Per-layer figures: heat maps of each kind's vectors (category x channel) and the
    categories' cosine similarities.

    Building a figure costs more than filling it, and a 100-layer model needs 100 of them: the
    painter builds one, draws its unchanging parts (category labels, titles, frames) once, and
    per layer restores that background and draws only what changes (blitting).
    """

    def __init__(self, kinds: Sequence[str], categories: Sequence[str]):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        k = len(categories)
        row = min(max(1.2, 0.13 * k + 0.6), 4.0)
        self.fig = fig = _new_figure(row * len(kinds) + 0.5)
        self.canvas = FigureCanvasAgg(fig)
        grid = fig.add_gridspec(
            len(kinds), 2, width_ratios=[4.2, 1.2], left=0.06, right=0.97, top=0.9, bottom=0.1
        )
        grid.update(wspace=0.12, hspace=0.45)
        self.kinds = list(kinds)
        self.maps = []
        changing = []
        for i, kind in enumerate(self.kinds):
            ax = fig.add_subplot(grid[i, 0])
            image = ax.imshow(
                np.zeros((k, 1)), aspect="auto", interpolation="antialiased", cmap=_cmap("magma")
            )
            ax.set_title(f"{kind} vectors (x C: 1 = even spread)", fontsize=8, loc="left", y=1.0)
            _category_ticks(ax, categories)
            bar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.025)
            bar.ax.tick_params(labelsize=7)
            self.maps.append((kind, ax, image))
            changing += [image, ax.xaxis, bar.ax]
        ax = fig.add_subplot(grid[:, 1])
        ax.set_anchor("N")
        self.sim = ax.imshow(np.zeros((k, k)), interpolation="antialiased", cmap=_cmap("viridis"))
        what = (
            "cosine: forward below,\nbackward above the diagonal"
            if "backward" in self.kinds
            else f"cosine of the {self.kinds[0]} vectors"
        )
        ax.set_title(what, fontsize=8, y=1.0)
        _category_ticks(ax, categories, "x")
        _category_ticks(ax, categories, "y")
        ax.tick_params(axis="x", labelrotation=90)
        bar = fig.colorbar(self.sim, ax=ax, pad=0.02, fraction=0.045)
        bar.ax.tick_params(labelsize=7)
        self.title = fig.suptitle("", fontsize=9, x=0.06, ha="left")
        self.changing = [*changing, self.sim, bar.ax, self.title]
        for artist in self.changing:
            artist.set_animated(True)  # left out of canvas.draw(): the background
        self.background = None

    def paint(self, stats: LayerStats, shown: np.ndarray, seen: np.ndarray) -> bytes:
        """The PNG of one layer; `shown` picks its channels, `seen` greys unseen categories."""
        assert list(stats.vectors) == self.kinds, "a painter serves layers with the same kinds"
        ticks = _channel_ticks(len(shown))
        for kind, ax, image in self.maps:
            # Relative to an even spread: 1 means the channel gets 1/C of the category's mass.
            values = stats.vectors[kind][:, shown] * stats.channels
            values[~seen] = np.nan
            top = np.nanpercentile(values, 99) if np.isfinite(values).any() else 1.0
            image.set_data(values)
            image.set_extent((-0.5, len(shown) - 0.5, len(values) - 0.5, -0.5))
            image.set_clim(0.0, max(float(top), 1e-12))
            ax.set_xticks(ticks, [str(int(shown[p])) for p in ticks], fontsize=7)
            ax.set_xlim(-0.5, len(shown) - 0.5)
        what = f"channel (all {stats.channels})"
        if len(shown) < stats.channels:
            what = f"channel ({len(shown)} of {stats.channels} with the highest peak)"
        self.maps[-1][1].set_xlabel(what, fontsize=8)
        sim = stats.similarity["forward"]
        back = stats.similarity.get("backward", sim)
        matrix = np.tril(sim, -1) + np.triu(back, 1) + np.diag(np.diag(sim))
        low = np.nanmin(matrix) if np.isfinite(matrix).any() else 0.0
        self.sim.set_data(matrix)
        self.sim.set_clim(min(math.floor(low * 10) / 10, 0.9), 1.0)
        div = ", ".join(f"{kind} {v:.3f}" for kind, v in stats.divergence.items())
        self.title.set_text(f"{stats.name}    divergence: {div}")
        if self.background is None:
            self.canvas.draw()
            self.background = self.canvas.copy_from_bbox(self.fig.bbox)
        else:
            self.canvas.restore_region(self.background)
        for artist in self.changing:
            self.fig.draw_artist(artist)
        return _canvas_png(self.canvas)


def _channel_ticks(n: int, most: int = 16) -> np.ndarray:
    """Tick positions every 1, 2, 4, 8, ... columns: at most `most` of them."""
    step = 1
    while n / step > most:
        step *= 2
    return np.arange(0, n, step)


def _canvas_png(canvas) -> bytes:
    """The canvas's pixels as a 256-colour PNG.

    Colour maps and anti-aliased text fit a 256-colour palette without visible change, and
    the file shrinks about threefold (a 100-layer report stays within its 20 MB). No date or
    software chunk: the same input gives the same bytes.
    """
    from PIL import Image

    width, height = canvas.get_width_height()
    image = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    image = image.convert("RGB").quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
    )
    # The octree averages white with its neighbours; snap it back so the page shows no box.
    palette = np.array(image.getpalette(), np.uint8).reshape(-1, 3)
    palette[palette.min(axis=1) >= 250] = 255
    image.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    image.save(buf, format="png")
    return buf.getvalue()


def divergence_figure(stats: Sequence[LayerStats], labels: Sequence[str]) -> bytes:
    """Divergence of the categories' vectors per layer, against depth."""
    fig = _new_figure(4.2, "constrained")
    ax = fig.add_subplot()
    depth = np.arange(len(stats))
    for kind in stats[0].divergence:
        values = [s.divergence.get(kind, math.nan) for s in stats]
        ax.plot(depth, values, "o-", ms=3, lw=1.2, label=kind, color=_KIND_COLOR.get(kind))
    ax.set_ylabel("divergence (1 - mean cosine)", fontsize=8)
    highest = np.nanmax([1.0, *(v for s in stats for v in s.divergence.values())])
    ax.set_ylim(0, 1.05 * highest)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _layer_ticks(ax, labels)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("Where categories separate: divergence by depth", fontsize=9, loc="left")
    return _png(fig)


def plan_figure(rows: Sequence[PlanRow], labels: Sequence[str]) -> bytes:
    """Kept over total channels per layer; frozen groups hatched, head layers outlined."""
    fig = _new_figure(4.2, "constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    totals = np.array([r.total for r in rows])
    kept = np.array([r.kept for r in rows])
    ax.bar(x, totals, color="#dddddd", width=0.8, label="total")
    frozen = np.array([r.frozen is not None for r in rows])
    head = np.array([r.head and r.frozen is None for r in rows])
    plain = ~frozen & ~head
    ax.bar(x[plain], kept[plain], color="#1f77b4", width=0.8, label="kept")
    if frozen.any():
        ax.bar(x[frozen], kept[frozen], color="#ff7f0e", hatch="//", width=0.8, label="frozen")
    if head.any():
        ax.bar(x[head], kept[head], color="#2ca02c", width=0.8, label="head (plan outputs)")
    ax.set_ylabel("channels", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=4, loc="upper left")
    ax.set_ylim(top=totals.max() * 1.15)
    _layer_ticks(ax, labels)
    ax.tick_params(axis="y", labelsize=7)
    share = kept.sum() / max(totals.sum(), 1)
    ax.set_title(f"Channels kept per layer ({share:.1%} of all)", fontsize=9, loc="left")
    return _png(fig)


def eval_figure(evals: Sequence[tuple[str, dict[str, Any]]], metric: str) -> bytes:
    """Per-class metric of each eval report, side by side."""
    classes = sorted({c for _, e in evals for c in e["per_class"]}, key=_natural)
    fig = _new_figure(3.6, "constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(evals)
    x = np.arange(len(classes))
    for i, (label, report) in enumerate(evals):
        values = [report["per_class"].get(c, math.nan) for c in classes]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=label)
    ax.set_xticks(x, classes, fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("category", fontsize=8)
    ax.set_ylabel("IoU" if metric == "miou" else "top-1", fontsize=8)
    ax.set_ylim(0, 1.18)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncols=min(len(evals), 4))
    ax.set_title("Per-category quality", fontsize=9, loc="left")
    return _png(fig)


def route_figure(graph: RouteGraph, labels: Sequence[str], category: str) -> bytes:
    """The route's top channels per layer as nodes, the relevance flow between them as edges."""
    from matplotlib.collections import LineCollection

    fig = _new_figure(4.8, "constrained")
    ax = fig.add_subplot()
    depth = max((len(n) for n in graph.nodes), default=1)
    if graph.edges:
        segments = [
            _edge_path(a, depth - 1 - ra, b, depth - 1 - rb) for a, ra, b, rb, _ in graph.edges
        ]
        weights = np.array([e[4] for e in graph.edges])
        colors = np.zeros((len(weights), 4))
        colors[:, 3] = 0.1 + 0.6 * weights
        ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.4 + 2.2 * weights))
    xs, ys, shares = [], [], []
    for col, nodes in enumerate(graph.nodes):
        for row, (channel, share) in enumerate(nodes):
            y = depth - 1 - row
            if graph.head and col == len(graph.nodes) - 1:
                ax.scatter([col], [y], s=220, marker="s", color="#333333", zorder=3)
                ax.annotate(
                    f"logit {category}", (col, y), xytext=(10, -3), textcoords="offset points"
                )
                continue
            xs.append(col)
            ys.append(y)
            shares.append(share)
            ax.annotate(str(channel), (col, y), xytext=(7, 3), textcoords="offset points")
    for text in ax.texts:
        text.set_fontsize(7)
    shares_a = np.array(shares)
    points = ax.scatter(
        xs, ys, s=25 + 600 * shares_a, c=shares_a, cmap="YlOrRd", vmin=0, edgecolors="k", zorder=3
    )
    bar = fig.colorbar(points, ax=ax, pad=0.01, fraction=0.02)
    bar.set_label("share of the layer's relevance", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_yticks([])
    ax.set_ylim(-0.7, depth - 0.3)
    _layer_ticks(ax, labels)
    ax.set_xlim(-0.4, len(labels) - 0.2)
    shown = len(graph.columns)
    what = f"the last {shown} of {graph.layers_total} layers" if shown < graph.layers_total else ""
    edges = "" if graph.edges else " (nodes only: edges need the model)"
    ax.set_title(
        f"Decision route of category {category}: top channels per layer {what}{edges}",
        fontsize=9,
        loc="left",
    )
    return _png(fig)


def _edge_path(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A straight edge to the next column; a bow over the columns it skips (a residual link),
    so it does not run through their nodes."""
    if x1 - x0 <= 1:
        return np.array([(x0, y0), (x1, y1)])
    t = np.linspace(0.0, 1.0, 17)[:, None]
    lift = np.array([0.5 * (x0 + x1), 0.5 * (y0 + y1) + min(0.22 * (x1 - x0), 1.0)])
    start, end = np.array([x0, y0]), np.array([x1, y1])
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * lift + t**2 * end


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
