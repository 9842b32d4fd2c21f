"""`onnxcut distill`: finish a sub-network against the model it was cut from, label-free."""

from __future__ import annotations

from pathlib import Path

import click

from onnxcut.cli.options import (
    input_shape_option,
    lazy_progress,
    model_argument,
    preprocess_options,
    preprocess_overrides,
)


@click.command("distill")
@model_argument
@click.option(
    "--teacher",
    "teachers",
    required=True,
    multiple=True,
    type=click.Path(dir_okay=False),
    help="The model MODEL was cut from; repeat once per part for an assembled MODEL.",
)
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Image folder.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="OUT.onnx")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--batch", type=int, default=16, show_default=True, help="Images per step.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option(
    "--warmup",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of the first epoch's steps over which the learning rate rises to --lr.",
)
@click.option(
    "--hints",
    type=float,
    default=0.0,
    show_default=True,
    help="Weight of feature hints: match each layer input to the teacher's kept channels "
    "(needs a student made by extract). 0: the output loss only.",
)
@click.option(
    "--hints-at",
    multiple=True,
    metavar="GLOB",
    help="Hint only at tensors whose name matches (repeatable; default: every layer input).",
)
@click.option(
    "--dropped",
    type=click.Choice(["renormalise", "background"]),
    default="renormalise",
    show_default=True,
    help="The teacher's probability of categories the student dropped: spread over the "
    "kept ones, or given to background (segmenters).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the image order.")
@click.option(
    "--freeze",
    multiple=True,
    metavar="PATTERN",
    help="Keep weights whose initializer or node name matches this glob (repeatable).",
)
@click.option("--freeze-op", multiple=True, metavar="OP", help="Keep this op's weights.")
@click.option("--masks", type=click.Path(), help="Label masks to mix in (segmentation).")
@click.option("--label-weight", type=float, default=0.5, show_default=True)
@click.option("--val", type=click.Path(), help="Print agreement with the teacher per epoch.")
@click.option("--checkpoint-every", type=int, default=50, show_default=True, help="Steps.")
@click.option("--category-axis", type=int, help="Category axis of the category output (default 1).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu")
@click.option("--threads", type=int)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
@preprocess_options
@input_shape_option
def distill_cmd(model, teachers, data_dir, out, **kw) -> None:
    """Train the sub-network MODEL to match --teacher on the images in --data."""
    from onnxcut.graph.io import save
    from onnxcut.graph.shapes import parse_input_shapes
    from onnxcut.train.distill import DistillOptions, distill

    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise click.UsageError(f"{out}: folder '{out_path.parent}' does not exist")
    pre = {k: kw.pop(k) for k in ("size", "layout", "channels", "scale", "mean", "std")}
    opts = DistillOptions(
        epochs=kw["epochs"],
        lr=kw["lr"],
        optimizer=kw["optimizer"],
        batch=kw["batch"],
        temperature=kw["temperature"],
        warmup=kw["warmup"],
        hints=kw["hints"],
        hints_at=tuple(kw["hints_at"]),
        dropped=kw["dropped"],
        seed=kw["seed"],
        freeze=tuple(kw["freeze"]),
        freeze_ops=tuple(kw["freeze_op"]),
        masks=kw["masks"],
        label_weight=kw["label_weight"],
        val=kw["val"],
        checkpoint_every=kw["checkpoint_every"],
        provider=kw["provider"],
        threads=kw["threads"],
        preprocess_file=kw["preprocess_file"],
        preprocess=preprocess_overrides(**pre),
        input_shapes=parse_input_shapes(kw["input_shapes"]),
        category_axis=kw["category_axis"],
    )
    teacher = teachers[0]
    if len(teachers) > 1:
        # An assembled student: its parts' models joined channel for channel as one teacher.
        from onnxcut.assemble.teachers import teacher_for

        teacher = teacher_for(model, teachers, input_shapes=opts.input_shapes)
    checkpoint = out_path.with_name(out_path.name + ".partial")

    def epoch_line(report) -> None:
        agreement = (
            f", agreement with the teacher on --val {report.agreement:.4f}"
            if report.agreement is not None
            else ""
        )
        click.echo(
            f"\nepoch {report.epoch}: mean loss {report.loss:.4f} over {report.images} "
            f"images{agreement}",
            err=True,
        )

    def loss_text(loss: float | None) -> str:
        return f"loss {loss:.4f}" if loss is not None else ""

    with lazy_progress("distill", show_pos=True, item_show_func=loss_text) as progress:
        result = distill(
            model,
            teacher,
            data_dir,
            opts,
            checkpoint=checkpoint,
            resume=kw["resume"],
            progress=progress,
            on_epoch=epoch_line,
        )
    save(result, out_path, source=model)
    checkpoint.unlink(missing_ok=True)
    click.echo(f"wrote {out}")
