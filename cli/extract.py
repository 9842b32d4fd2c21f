"""`onnxcut extract`: write the smaller model a plan describes."""

from __future__ import annotations

from functools import partial

import click
from onnx import ModelProto

from onnxcut.cli.options import input_shape_option, lazy_progress, model_argument
from onnxcut.cli.plan import selection_options

plan_option = click.option(
    "--plan",
    "plan_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Plan JSON (onnxcut.plan/1): kept channels by producer node and graph output.",
)
out_option = click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="Path of the model to write (never the input).",
)


def sizes(model: ModelProto) -> tuple[int, int | None]:
    """Return (params, FLOPs as MACs) of a model; dynamic batch counted as 1."""
    from onnxcut.channels.inspection import summarize
    from onnxcut.graph.shapes import default_batch_inplace, infer_shapes

    copy = ModelProto()
    copy.CopyFrom(model)
    if default_batch_inplace(copy):
        infer_shapes(copy)
    report = summarize(copy)
    return report["params"], report["flops"]


def echo_sizes(before: ModelProto, after: ModelProto) -> None:
    for label, old, new, unit in zip(
        ("params:", "FLOPs: "), sizes(before), sizes(after), ("", " MACs"), strict=True
    ):
        if old is None or new is None:
            click.echo(f"{label} unknown (pass --input-shape)")
        else:
            click.echo(f"{label} {old:,} -> {new:,}{unit} ({new / max(old, 1):.1%})")


@click.command("extract")
@model_argument
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(dir_okay=False, path_type=str),
    help="Plan JSON (onnxcut.plan/1); or give --scores with --classes instead.",
)
@click.option(
    "--scores",
    type=click.Path(dir_okay=False),
    help="Make the plan from SCORES.npz and --classes in the same step.",
)
@partial(selection_options, classes_required=False)
@click.option(
    "--reconstruct",
    type=click.Path(),
    help="Images (no labels): refit the layers that read removed channels so their outputs "
    "match the original's (least squares), then cut.",
)
@click.option(
    "--reconstruct-images",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images of --reconstruct to fit on.",
)
@out_option
@input_shape_option
def extract_cmd(
    model: str,
    plan_path: str | None,
    scores: str | None,
    output: str,
    input_shapes: tuple[str, ...],
    reconstruct: str | None,
    reconstruct_images: int,
    **selection,
) -> None:
    """Slice the channels a plan removes out of MODEL and write the smaller model.

    Give either --plan, or --scores with --classes (plan and extract in one step).
    --input-shape fixes those inputs in the written model too.
    """
    from onnxcut.channels.plan import load_plan, parse_plan
    from onnxcut.channels.surgery import extract
    from onnxcut.cli.plan import build_plan, echo_selection
    from onnxcut.graph.io import load, save
    from onnxcut.graph.shapes import parse_input_shapes

    if (plan_path is None) == (scores is None):
        raise click.UsageError("give either --plan PLAN.json or --scores SCORES.npz --classes")
    if scores is not None and not selection["classes"]:
        raise click.UsageError("--scores needs --classes, e.g. --classes 4,8")
    shapes = parse_input_shapes(input_shapes)
    if scores is not None:
        built = build_plan(
            model,
            scores,
            reconstruct=reconstruct,
            reconstruct_images=reconstruct_images,
            **selection,
        )
        plan = parse_plan(built, scores)
    else:
        plan = load_plan(plan_path)
        if selection["compensate"]:
            from onnxcut.attribution.compensation import compensate

            plan = compensate(load(model, shapes), plan, selection["compensate"])
    source = model
    if reconstruct is not None:
        from onnxcut.attribution.reconstruction import reconstruct as refit
        from onnxcut.channels.plan import check_model_sha
        from onnxcut.data import list_images

        if plan.compensation:
            raise click.UsageError("--reconstruct refits the biases too: drop --compensate")
        check_model_sha(plan, model)  # the refit model is in memory: check the file's here
        # The images the plan's agreement was measured on stay out of the refit, as they
        # did for the candidates the guard measured.
        held_out = selection.get("agreement_data") if scores is not None else None
        exclude = {p.resolve() for p in list_images(held_out)} if held_out else set()
        with lazy_progress("reconstruct") as progress:  # counts the refit layers
            source = refit(
                load(model, shapes),
                plan,
                reconstruct,
                limit=reconstruct_images,
                progress=progress,
                exclude=exclude,
            )
    cut = extract(source, plan, input_shapes=shapes)
    save(cut, output, source=model)
    echo_sizes(load(model, shapes), cut)
    if scores is not None:
        echo_selection(built)
    click.echo(f"wrote {output}")
