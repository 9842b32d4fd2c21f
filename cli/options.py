"""Options shared by several verbs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

input_shape_option = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:DIMS",
    help="Fix a dynamic input shape, e.g. input:1x3x256x256 (repeatable).",
)


@contextmanager
def lazy_progress(label: str, **bar_options) -> Iterator[Callable[..., None]]:
    """A progress bar on stderr that opens at its first update, so an error found before
    any work (while loading, checking) stays one line. Yields update(done, total, *item)."""
    bars: list = []

    def update(done: int, total: int, *item) -> None:
        if not bars:
            bar = click.progressbar(length=total, label=label, file=sys.stderr, **bar_options)
            bars.append(bar.__enter__())
        bars[0].update(done - bars[0].pos, *item)

    try:
        yield update
    finally:
        if bars:
            bars[0].__exit__(None, None, None)


def model_argument(f):
    return click.argument("model", type=click.Path(dir_okay=False, path_type=str))(f)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got '{text}'", param_hint=flag
        ) from None


def _size(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW, got '{text}'", param_hint="--size") from None
    return [h, w]


_PREPROCESS = [
    click.option("--preprocess", "preprocess_file", type=click.Path(), help="Preprocess JSON."),
    click.option("--size", help="Resize images to HxW."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"])),
    click.option("--channels", type=click.Choice(["rgb", "bgr", "gray"])),
    click.option("--scale", type=float),
    click.option("--mean", help="a,b,c"),
    click.option("--std", help="a,b,c"),
]


def preprocess_options(f):
    """The image preprocessing flags; defaults come from the model's metadata."""
    for option in reversed(_PREPROCESS):
        f = option(f)
    return f


def preprocess_overrides(size, layout, channels, scale, mean, std) -> dict:
    """The preprocessing flags as overrides for data.preprocess_from (None: not given)."""
    return {
        "size": _size(size),
        "layout": layout,
        "channels": channels,
        "scale": scale,
        "mean": _floats(mean, "--mean"),
        "std": _floats(std, "--std"),
    }
