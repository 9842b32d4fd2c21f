"""Options shared by several verbs."""

from __future__ import annotations

import click

input_shape_option = click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME:DIMS",
    help="Fix a dynamic input shape, e.g. input:1x3x256x256 (repeatable).",
)


def model_argument(f):
    return click.argument("model", type=click.Path(dir_okay=False, path_type=str))(f)
