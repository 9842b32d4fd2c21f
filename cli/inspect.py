"""`onnxcut inspect`: what a model holds, as a table or as JSON."""

from __future__ import annotations

import json

import click

from onnxcut.cli.options import input_shape_option, model_argument


def _shape(d) -> str:
    return "x".join(str(x) for x in d) if d is not None else "?"


def _count(n: int | None) -> str:
    return "unknown (pass --input-shape)" if n is None else f"{n:,}"


def _print_text(path: str, report: dict) -> None:
    echo = click.echo
    echo(
        f"{path}: opset {report['opset']}, IR {report['ir_version']}, "
        f"{report['nodes']} nodes, producer '{report['producer'] or '?'}'"
    )
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            echo(f"  {kind[:-1]:<6} {v['name']}: {_shape(v['shape'])}")
    if report.get("assumed"):
        echo(f"  assumed: {report['assumed']}")
    echo(f"params: {_count(report['params'])} float weight elements")
    echo(f"FLOPs:  {_count(report['flops'])} MACs (Conv/ConvTranspose/Gemm/MatMul, per run)")
    echo("")
    echo(f"{'layer':<36} {'op':<13} {'in':>6} {'out':>6} {'kernel':>7} {'groups':>6} {'MACs':>15}")
    for row in report["layers"]:
        kernel = "x".join(map(str, row["kernel"])) or "-"
        echo(
            f"{row['name'][:36]:<36} {row['op']:<13} {row['in_channels']!s:>6} "
            f"{row['out_channels']!s:>6} {kernel:>7} {row['groups']:>6} "
            f"{_count(row['flops']) if row['flops'] is not None else '?':>15}"
        )
    _print_groups(report)


def _print_groups(report: dict) -> None:
    groups = report["groups"]
    n_prunable = sum(g["prunable"] for g in groups)
    click.echo("")
    click.echo(
        f"channel groups: {len(groups)}, {n_prunable} prunable; "
        f"{report['prunable_param_share']:.1%} of layer weights removable"
    )
    for g in groups:
        state = "prunable" if g["prunable"] else f"frozen: {g['reason']}"
        producers = ", ".join(g["producers"])
        click.echo(f"  group {g['id']:<3} {g['channels']:>5} ch  {producers}  [{state}]")


@click.command("inspect")
@model_argument
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@input_shape_option
def inspect_cmd(model: str, as_json: bool, input_shapes: tuple[str, ...]) -> None:
    """Show opset, inputs/outputs, parameters, FLOPs and parameter layers of MODEL."""
    from onnxcut.channels.inspection import summarize
    from onnxcut.graph.io import load
    from onnxcut.graph.shapes import default_batch_inplace, infer_shapes, parse_input_shapes

    proto = load(model, parse_input_shapes(input_shapes))
    assumed = default_batch_inplace(proto)
    if assumed:
        infer_shapes(proto)
    report = summarize(proto)
    if assumed:
        report["assumed"] = f"batch 1 for dynamic input(s) {', '.join(assumed)}"
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_text(model, report)
