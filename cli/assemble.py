"""`onnxcut assemble`: join category parts of several models into one model."""

from __future__ import annotations

import json
import os

import click

from onnxcut.cli.options import input_shape_option


@click.command("assemble")
@click.argument("parts", nargs=-1, required=True, metavar="MODEL[@PLAN.json][:CATS]...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Path of the assembled model to write.",
)
@click.option("--input", "input_name", help="Map every part's single input onto this name.")
@input_shape_option
@click.option(
    "--background",
    type=click.Choice(["first", "max"]),
    default="first",
    show_default=True,
    help="Segmentation background logit: the first part's, or the maximum over the parts.",
)
@click.option(
    "--background-category",
    type=int,
    default=0,
    show_default=True,
    help="The category that is background in every segmentation part.",
)
@click.option(
    "--resize-outputs",
    is_flag=True,
    help="Resize segmentation outputs of different sizes to the largest (bilinear).",
)
@click.option(
    "--share",
    type=click.Choice(["union", "exact"]),
    default="union",
    show_default=True,
    help="Plan parts of one model: one sub-network with the union of their channels, or "
    "each its own (identical nodes are shared either way).",
)
@click.option(
    "--calibrate",
    type=click.Path(file_okay=False),
    help="Unlabeled images: fit a temperature per part so their confidences match.",
)
@click.option("--calibrate-limit", type=int, default=256, show_default=True, help="Images used.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu")
@click.option("--threads", type=int)
def assemble_cmd(
    parts: tuple[str, ...],
    output: str,
    input_name: str | None,
    input_shapes: tuple[str, ...],
    **kw,
) -> None:
    """Join PARTS into one model that outputs the union of their categories.

    Each part is a model or a sub-network made by extract, with an optional category list
    (MODEL:3,5), or a model with a plan (MODEL@PLAN.json): plan parts of one model become one
    sub-network keeping the union of their channels. The category outputs are joined in the
    order given; onnxcut.categories records [part, original category] per output channel.
    """
    from onnxcut.assemble import ASSEMBLY_KEY, AssembleOptions, assemble, parse_part
    from onnxcut.cli.extract import sizes
    from onnxcut.errors import OutputError
    from onnxcut.graph.io import save
    from onnxcut.graph.shapes import parse_input_shapes

    given = [parse_part(p) for p in parts]
    for p in given:
        if os.path.exists(output) and os.path.exists(p.model) and os.path.samefile(output, p.model):
            raise OutputError(f"{output}: output is the part {p.model}; choose another -o path")
    options = AssembleOptions(
        input_name=input_name, input_shapes=parse_input_shapes(input_shapes) or None, **kw
    )
    model = assemble(given, options)
    save(model, output)
    info = json.loads({p.key: p.value for p in model.metadata_props}[ASSEMBLY_KEY])
    for k, part in enumerate(info["parts"]):
        cats = ",".join(map(str, part["categories"])) or "background only"
        if part["unit"] is None:
            click.echo(f"part {k} {part['model']}: left out (no channel to join)")
            continue
        unit = info["units"][part["unit"]]
        line = f"part {k} {part['model']}: categories {cats} (unit {unit['prefix']}"
        if options.calibrate is not None:
            line += f", temperature {unit['temperature']:.3f}"
        click.echo(line + ")")
    params, flops = sizes(model)
    shown = f"{flops:,} MACs" if flops is not None else "unknown FLOPs (pass --input-shape)"
    click.echo(f"assembled: {params:,} params, {shown}, {info['shared_nodes']} nodes shared")
    click.echo(f"wrote {output}")
