"""`onnxcut plan`: choose the channels the chosen categories need, as a plan file."""

from __future__ import annotations

import json

import click


def selection_options(f, classes_required: bool = True):
    """Options shared by `plan` and `extract --scores`."""
    for option in reversed(
        [
            click.option("--classes", required=classes_required, help="Categories, e.g. 4,8."),
            click.option(
                "--alpha",
                type=float,
                default=0.9,
                show_default=True,
                help="Share of the forward-vector mass a kept channel must be in.",
            ),
            click.option(
                "--beta",
                type=float,
                default=0.9,
                show_default=True,
                help="Share of the backward-vector mass a kept channel must be in.",
            ),
            click.option("--layers", help="last:N or comma-separated layers to cut (default all)."),
            click.option("--min-keep", type=int, help="Keep at least N channels per group."),
            click.option(
                "--background",
                default="0",
                show_default=True,
                help="Head channel kept besides the classes (segmentation), or none.",
            ),
            click.option(
                "--criterion",
                type=click.Choice(["disassembler", "forward", "backward", "taylor", "relevance"]),
                default="disassembler",
                show_default=True,
                help="Scores a kept channel must rank high in (relevance: classifiers).",
            ),
            click.option(
                "--rank",
                type=click.Choice(["scores", "l1"]),
                default="scores",
                show_default=True,
                help="Which channels fill each group's count: best scores, or largest filter L1.",
            ),
            click.option(
                "--round-to",
                type=int,
                help="Round kept counts up to a multiple of N (8 or 16 suit CPU kernels).",
            ),
            click.option(
                "--keep-head",
                is_flag=True,
                help="Keep every category in the head (the original's probabilities).",
            ),
            click.option(
                "--flops",
                type=float,
                help="Keep at most this share of the FLOPs, 0 < F <= 1 (instead of alpha/beta).",
            ),
            click.option(
                "--params",
                type=float,
                help="Keep at most this share of the parameters, 0 < F <= 1.",
            ),
            click.option(
                "--allocate",
                type=click.Choice(["uniform", "scores", "sensitivity"]),
                help="How a budget is spread over layers (default: sensitivity with --data, "
                "else uniform).",
            ),
            click.option(
                "--min-agreement",
                type=float,
                help="Smallest sub-network agreeing with the original on this share of --data.",
            ),
            click.option(
                "--data",
                "agreement_data",
                type=click.Path(),
                help="Held-out images (no labels needed) for --min-agreement, and to measure "
                "each layer's sensitivity for a --flops/--params budget.",
            ),
            click.option(
                "--allow-full",
                is_flag=True,
                help="With --min-agreement: keep every channel when nothing smaller agrees.",
            ),
            click.option(
                "--confidence",
                type=float,
                help="With --min-agreement: the agreement must hold on this share of "
                "bootstrap resamples of --data, not only on --data itself (default 0.95); 0 "
                "compares the agreement on --data alone.",
            ),
            click.option(
                "--compensate",
                type=click.Path(),
                help="Images (no labels) to measure removed channels' means on; their readers' "
                "biases take them (the plan's compensation section).",
            ),
        ]
    ):
        f = option(f)
    return f


def build_plan(
    model: str | None,
    scores_path: str,
    classes: str,
    background: str = "0",
    min_agreement: float | None = None,
    agreement_data: str | None = None,
    allow_full: bool = False,
    confidence: float | None = None,
    compensate: str | None = None,
    reconstruct: str | None = None,
    reconstruct_images: int = 64,
    **selection,
) -> dict:
    """Make the plan for the selection options of `plan` and `extract --scores`.

    `selection` holds the remaining options by name (alpha, beta, layers, min_keep, criterion,
    rank, round_to, keep_head, flops, params), as Selection's fields.
    """
    from pathlib import Path

    from onnxcut.attribution.scores import load_scores
    from onnxcut.attribution.selection import Selection, parse_classes
    from onnxcut.errors import DataError
    from onnxcut.graph.io import load, sha256

    if model is None:
        model = load_scores(scores_path).meta.get("model_path")
        if not model or not Path(model).is_file():
            raise DataError(
                f"{scores_path}: the model it was made from ({model}) is not there; "
                "pass --model MODEL"
            )
    scores = load_scores(scores_path, sha256(model))
    if background.lower() == "none":
        bg = None
    else:
        try:
            bg = int(background)
        except ValueError:
            raise DataError(f"--background '{background}': an index or none") from None
    sel = Selection(parse_classes(classes, scores.categories), background=bg, **selection)
    proto = load(model)
    refit_on = (reconstruct, reconstruct_images) if reconstruct is not None else None
    if confidence is not None and min_agreement is None:
        raise DataError("--confidence bounds --min-agreement's agreement: give --min-agreement")
    confidence = 0.95 if confidence is None else confidence
    guard = {"allow_full": allow_full, "confidence": confidence or None}  # 0: on --data alone
    plan = _select(proto, scores, sel, min_agreement, agreement_data, guard, refit_on)
    if compensate is None:
        return plan
    from onnxcut import data
    from onnxcut.attribution.compensation import compensate as measure

    pre = data.fit_to_model(
        data.preprocess_from(proto, overrides=scores.meta.get("preprocess") or {}), proto
    )
    return measure(proto, plan, compensate, preprocess=pre).to_dict()


def _select(proto, scores, sel, min_agreement, agreement_data, guard, refit_on) -> dict:
    """The plan for a selection: thresholds, a budget, or the agreement guard (which measures
    the reconstructed sub-network when `refit_on` names images to refit on, and how many;
    the images of --data are left out of the refit, or the guard would measure the fit)."""
    from onnxcut.attribution.selection import make_plan
    from onnxcut.errors import DataError

    if agreement_data is None:
        if min_agreement is not None:
            raise DataError("--min-agreement needs --data DIR: held-out images to compare on")
        return make_plan(proto, scores, sel)
    from onnxcut import data
    from onnxcut.attribution import agreement

    agreement.warn_if_attributed(agreement_data, scores.meta.get("data_path"))
    pre = data.fit_to_model(
        data.preprocess_from(proto, overrides=scores.meta.get("preprocess") or {}), proto
    )
    check = agreement.AgreementCheck(
        proto,
        agreement_data,
        agreement.chosen_categories(sel, scores.meta.get("task")),
        preprocess=pre,
        background=agreement.background_of(sel, scores.meta.get("task")),
    )
    if min_agreement is None:
        return make_plan(proto, scores, sel, check=check)
    cut = None
    if refit_on is not None:
        from onnxcut.attribution.reconstruction import reconstruct as refit
        from onnxcut.channels.surgery import extract

        def cut(model, plan):
            folder, limit = refit_on
            refit_model = refit(
                model, plan, folder, preprocess=pre, limit=limit, exclude=check.paths
            )
            return extract(refit_model, plan)

    plan = agreement.guarded_plan(
        proto,
        lambda s, check: make_plan(proto, scores, s, check=check),
        sel,
        check,
        min_agreement,
        **guard,
        cut=cut,
    )
    if refit_on is not None:  # the agreement holds for the refit sub-network only
        plan["selection"]["reconstructed"] = True
    return plan


@click.command("plan")
@click.argument("scores", type=click.Path(dir_okay=False))
@selection_options
@click.option(
    "--model",
    type=click.Path(dir_okay=False),
    help="The model SCORES was made from (default: the path recorded in SCORES).",
)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def plan_cmd(scores: str, model: str | None, out: str, **selection) -> None:
    """Write the plan (kept channels per layer, head outputs) for --classes from SCORES."""
    from onnxcut.graph.io import write_text

    plan = build_plan(model, scores, **selection)
    write_text(out, json.dumps(plan, indent=1))
    kept = sum(len(v) for v in plan["keep"].values())
    click.echo(f"{out}: {len(plan['keep'])} groups cut, {kept} channels kept in them")
    echo_selection(plan)


def echo_selection(plan: dict) -> None:
    """Say what a budget or an agreement guard found."""
    for key, value in plan.get("selection", {}).items():
        if key.endswith("_reached"):
            click.echo(f"  {key[: -len('_reached')]} kept: {value:.3f} of the original")
        elif key == "agreement":
            bound = plan["selection"].get("confidence")
            how = f" (its {bound:g} bootstrap lower bound)" if bound else ""
            click.echo(f"  agreement with the original on --data{how}: {value:.4f}")
