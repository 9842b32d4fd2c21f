"""`onnxcut eval`: quality, size and latency of a model on a labelled folder."""

from __future__ import annotations

import json

import click

from onnxcut.cli.options import model_argument


@click.command("eval")
@model_argument
@click.option("--data", "data_dir", required=True, type=click.Path(), help="Image folder.")
@click.option("--masks", type=click.Path(), help="Label masks (segmentation).")
@click.option("--classes", help="Evaluate the category-customised task for these, e.g. 4,8.")
@click.option("--background", type=int, default=0, show_default=True)
@click.option("--output", help="Output holding the categories (default: the only one).")
@click.option("--category-axis", type=int, help="Category axis of that output (default 1).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu")
@click.option("--threads", type=int)
@click.option("--runs", type=int, default=20, show_default=True, help="Latency repetitions.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(
    model,
    data_dir,
    masks,
    classes,
    background,
    output,
    category_axis,
    provider,
    threads,
    runs,
    as_json,
) -> None:
    """Score MODEL on --data: mIoU or top-1, params, FLOPs and median latency."""
    from onnxcut.attribution.selection import parse_classes
    from onnxcut.evaluation.metrics import EvalOptions, evaluate

    chosen = None
    if classes:
        chosen = parse_classes(classes, [str(i) for i in range(256)])
    report = evaluate(
        model,
        data_dir,
        EvalOptions(
            masks=masks,
            classes=chosen,
            background=background,
            output=output,
            category_axis=category_axis,
            provider=provider,
            threads=threads,
            latency_runs=runs,
        ),
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    metric = "miou" if report["task"] == "segment" else "top1"
    click.echo(f"{model}: {metric} {report[metric]:.4f} over {report['images']} images")
    if "miou_classes" in report:
        click.echo(f"  mIoU of the chosen classes: {report['miou_classes']:.4f}")
    if report.get("images_without_mask"):
        click.echo(f"  {report['images_without_mask']} images without a label mask skipped")
    click.echo("  per class: " + ", ".join(f"{k}:{v:.3f}" for k, v in report["per_class"].items()))
    flops = f"{report['flops']:,}" if report["flops"] is not None else "unknown"
    click.echo(
        f"  params {report['params']:,}, FLOPs {flops} MACs, "
        f"latency {report['latency_ms']:.2f} ms (median of {report['latency_runs']})"
    )
