"""`onnxcut report`: one self-contained HTML page of a run's scores, plan and evaluations."""

from __future__ import annotations

import click


@click.command("report")
@click.argument("scores", type=click.Path(dir_okay=False))
@click.option("--plan", type=click.Path(dir_okay=False), help="Plan JSON: kept channels, sizes.")
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="The model SCORES was made from (default: the path recorded in SCORES).",
)
@click.option(
    "--sub", type=click.Path(dir_okay=False), help="The extracted sub-network: size and latency."
)
@click.option(
    "--eval",
    "evals",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="A report from onnxcut eval --json (repeatable).",
)
@click.option("--route", help="Categories whose decision route to draw (classifiers), e.g. 3,5.")
@click.option(
    "--max-channels",
    type=int,
    default=256,
    show_default=True,
    help="Wider layers show this many channels (highest peak) in their heat maps.",
)
@click.option("--runs", type=int, default=20, show_default=True, help="Latency repetitions.")
@click.option(
    "--threads", type=int, default=1, show_default=True, help="onnxruntime threads for latency."
)
@click.option("--title", help="Page title.")
@click.option("--png", "png_dir", type=click.Path(file_okay=False), help="Also write PNGs here.")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def report_cmd(
    scores, plan, model, sub, evals, route, max_channels, runs, threads, title, png_dir, out
) -> None:
    """Write an HTML report of SCORES: heat maps, divergence, plan, evaluations, routes."""
    from onnxcut.report import ReportOptions, report
    from onnxcut.report.figures import require_matplotlib

    require_matplotlib()  # before reading anything: a missing extra is the first thing to say
    routes = None
    if route:
        from onnxcut.attribution.scores import load_scores

        routes = _categories(route, load_scores(scores).categories)
    path, pictures = report(
        scores,
        out,
        ReportOptions(
            plan=plan,
            model=model,
            sub=sub,
            evals=evals,
            png_dir=png_dir,
            routes=routes,
            max_channels=max_channels,
            latency_runs=runs,
            threads=threads,
            title=title,
        ),
    )
    size = path.stat().st_size / 1e6
    where = f", PNGs in {png_dir}" if png_dir else ""
    click.echo(f"{path}: {len(pictures)} figures, {size:.2f} MB{where}")


def _categories(text: str, names: list[str]) -> tuple[int, ...]:
    """`3,5` (category names, else indices) as indices."""
    from onnxcut.errors import DataError

    out = []
    for item in (i.strip() for i in text.split(",")):
        if item in names:
            out.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            out.append(int(item))
        else:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise DataError(f"--route '{item}': not a category of the scores ({shown})")
    return tuple(dict.fromkeys(out))
