"""`onnxcut attribute`: per-layer, per-category channel scores over an image folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from onnxcut.cli.options import (
    input_shape_option,
    lazy_progress,
    model_argument,
    preprocess_options,
    preprocess_overrides,
)


@click.command("attribute")
@model_argument
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Image folder.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="SCORES.npz")
@click.option("--task", type=click.Choice(["auto", "segment", "classify"]), default="auto")
@click.option(
    "--tau",
    type=float,
    default=0.9,
    show_default=True,
    help="Confidence threshold for the category masks / confident samples.",
)
@click.option("--masks", type=click.Path(), help="Label masks with the images' stems.")
@click.option("--output", help="Output holding the categories (default: the only one).")
@click.option("--category-axis", type=int, help="Category axis of that output (default 1).")
@click.option("--probs", type=click.Choice(["softmax", "sigmoid", "identity"]))
@click.option("--layers", help="Comma-separated producer nodes to probe (default: all Conv).")
@click.option(
    "--class-names",
    type=click.Path(exists=True, dir_okay=False),
    help="File with one category name a line, in index order.",
)
@preprocess_options
@click.option(
    "--top-k", type=int, help="Classify: the N most confident images per class (instead of --tau)."
)
@click.option(
    "--objective",
    type=click.Choice(["logit", "logprob"]),
    default="logit",
    show_default=True,
    help="S_k sums the category's logit, or its log-softmax.",
)
@click.option(
    "--batch",
    type=int,
    default=8,
    show_default=True,
    help="Images per forward and backward call (a fixed model batch wins); memory grows with it.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu")
@click.option("--threads", type=int)
@click.option(
    "--grad",
    type=click.Choice(["symbolic", "finite-diff", "ort-training"]),
    default="symbolic",
    show_default=True,
)
@click.option("--shard", help="K/N: take the K-th of N deterministic slices of the images.")
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="local",
    help="Run the shards as Ray tasks: --ray alone starts a local cluster; --ray=ADDRESS "
    "(HOST:PORT, ray://HOST:PORT or auto) joins one. Needs onnxcut[ray].",
)
@click.option("--shards", type=int, help="With --ray: shards to run (default: the cluster's CPUs).")
@input_shape_option
def attribute_cmd(
    model,
    data_dir,
    out,
    task,
    tau,
    masks,
    output,
    category_axis,
    probs,
    layers,
    class_names,
    preprocess_file,
    size,
    layout,
    channels,
    scale,
    mean,
    std,
    top_k,
    objective,
    batch,
    provider,
    threads,
    grad,
    shard,
    resume,
    ray_address,
    shards,
    input_shapes,
) -> None:
    """Score the channels of MODEL's layers per category over the images in --data."""
    from onnxcut.attribution.driver import AttributeOptions, attribute
    from onnxcut.attribution.scores import save_scores
    from onnxcut.graph.shapes import parse_input_shapes

    out_path = Path(out)
    if not out_path.parent.is_dir():
        raise click.UsageError(f"{out}: folder '{out_path.parent}' does not exist")
    overrides = preprocess_overrides(size, layout, channels, scale, mean, std)
    names = None
    if class_names:
        names = tuple(
            line.strip() for line in Path(class_names).read_text().splitlines() if line.strip()
        )
    opts = AttributeOptions(
        task=task,
        tau=tau,
        output=output,
        category_axis=category_axis,
        probs=probs,
        layers=tuple(layers.split(",")) if layers else None,
        top_k=top_k,
        objective=objective,
        batch=batch,
        provider=provider,
        threads=threads,
        grad=grad,
        shard=shard,
        masks=masks,
        class_names=names,
        preprocess_file=preprocess_file,
        preprocess=overrides,
        input_shapes=parse_input_shapes(input_shapes),
    )
    checkpoint = out_path.with_name(out_path.name + ".partial")
    if shards is not None and ray_address is None:
        raise click.UsageError("--shards N runs with --ray; without it use --shard K/N")
    with lazy_progress("attribute", show_pos=True) as progress:
        if ray_address is not None:
            from onnxcut.attribution.cluster import attribute_ray

            scores = attribute_ray(
                model,
                data_dir,
                opts,
                address=ray_address,
                shards=shards,
                work_dir=out_path.with_name(out_path.name + ".shards"),
                resume=resume,
                progress=progress,
            )
        else:
            scores = attribute(
                model, data_dir, opts, checkpoint=checkpoint, resume=resume, progress=progress
            )
    scores.meta.pop("done", None)
    save_scores(scores, out_path)
    checkpoint.unlink(missing_ok=True)
    shutil.rmtree(out_path.with_name(out_path.name + ".shards"), ignore_errors=True)
    seen = ", ".join(
        f"{c}:{int(n)}" for c, n in zip(scores.categories, scores.count, strict=True) if n
    )
    click.echo(
        f"{out}: {scores.meta['images']} images ({scores.meta['skipped']} skipped), "
        f"{len(scores.layers())} layers; images per category {seen or 'none'}"
    )
