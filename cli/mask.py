"""`onnxcut mask`: write the same-shaped model with a plan's removed channels zeroed."""

from __future__ import annotations

import dataclasses

import click
from onnx import numpy_helper

from onnxcut.cli.extract import echo_sizes, out_option, plan_option
from onnxcut.cli.options import input_shape_option, model_argument


@click.command("mask")
@model_argument
@plan_option
@out_option
@input_shape_option
def mask_cmd(model: str, plan_path: str, output: str, input_shapes: tuple[str, ...]) -> None:
    """Zero the weights that read the channels a plan removes; shapes stay as they are.

    The masked model is the reference an extracted model matches on its kept outputs.
    """
    from onnxcut.channels.plan import load_plan
    from onnxcut.channels.surgery import extract, mask
    from onnxcut.graph.io import load, save
    from onnxcut.graph.shapes import parse_input_shapes

    shapes = parse_input_shapes(input_shapes)
    plan = load_plan(plan_path)
    masked = mask(model, plan, input_shapes=shapes)
    save(masked, output, source=model)
    original = load(model, shapes)
    zeroed = sum(
        int((numpy_helper.to_array(t) == 0).sum()) for t in masked.graph.initializer
    ) - sum(int((numpy_helper.to_array(t) == 0).sum()) for t in original.graph.initializer)
    click.echo("if extracted (the masked model keeps every shape):")
    # The plan's model_sha256 was checked against the file by mask() above.
    echo_sizes(original, extract(original, dataclasses.replace(plan, model_sha256=None)))
    click.echo(f"zeroed {zeroed:,} weight elements; wrote {output}")
