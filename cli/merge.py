"""`onnxcut merge`: add up the scores of shards of one run."""

from __future__ import annotations

import click


@click.command("merge")
@click.argument("scores", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def merge_cmd(scores: tuple[str, ...], out: str) -> None:
    """Merge shard SCORES files of one run into one, exactly."""
    from onnxcut.attribution.scores import merge, save_scores

    merged = merge(scores)
    save_scores(merged, out)
    click.echo(f"{out}: {len(scores)} files, {merged.meta['images']} images")
