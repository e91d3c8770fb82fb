"""The registry commands: `dynroute register`, `select` and `predict` (the Pareto-aware model
registry). Handlers call dynroute.pipelines.registry_stage; the library is in
dynroute.platform.registry (front, register, selection). cli.py adds them to the `dynroute` app,
and says why the handlers import their stage inside the function."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dynroute.pipelines.cli_common import (
    InferenceDevice,
    InferenceFast,
    fail,
    load_params,
    tracking_uri,
    with_inference,
)


def _registry_errors() -> tuple[type[Exception], ...]:
    # MLflow's own errors (register.SERVICE_ERRORS) are the app's top level's, as for every
    # command (cli_common.CommandGroup): an unreachable server is said the same way everywhere.
    return (ValueError, FileNotFoundError)


def _registry_figure(value: float, spec: str = ".4g") -> str:
    return "-" if value != value else format(value, spec)  # NaN: a tag that was never written


def register_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    pareto: Annotated[Path, typer.Option(help="The pareto stage's front (pareto.json).")]
    = Path("artifacts/pareto/pareto.json"),
    out: Annotated[Path, typer.Option(help="Write the registry summary here (JSON).")]
    = Path("artifacts/registry.json"),
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the headline (versions on the front, the knee's version) here (a DVC "
             "metrics file).")] = None,
) -> None:
    """Register the Pareto front as versions of one model per dataset, with tags and aliases.

    Idempotent: models already registered are found again; versions that left the front lose
    the registry's aliases and are tagged pareto=false (nothing is deleted).
    """
    from dynroute.pipelines.registry_stage import run_register

    p = load_params(params)
    try:
        with tracking_uri(p) as uri:
            state = run_register(p, pareto=pareto, uri=uri, out=out, metrics=metrics)
    except _registry_errors() as err:
        raise fail(str(err)) from None
    front = [v for v in state.versions if v.pareto]
    typer.echo(f"registered model {state.name}: {len(front)} versions on the front "
               f"({len(state.created)} new, {len(state.returned)} back on it), "
               f"{len(state.left_front)} left it; budget edges "
               f"{', '.join(f'{e:g}' for e in state.budget_edges) or 'none'}"
               f"{' (automatic)' if state.automatic_edges else ''}\n")
    typer.echo(f"{'version':>7}  {'trial':<26}{'mIoU':>8}{'GFLOPs':>10}  {'pareto':<7}aliases")
    for v in state.versions:
        miou, gflops = _registry_figure(v.miou, ".4f"), _registry_figure(v.gflops_mean)
        typer.echo(f"{v.version:>7}  {(v.trial or '-')[:25]:<26}{miou:>8}{gflops:>10}  "
                   f"{str(v.pareto).lower():<7}{', '.join(v.aliases) or '-'}")
    for warning in state.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(f"\nsummary: {out}")


def select_command(
    max_gflops: Annotated[float | None, typer.Option(
        help="Budget: mean GFLOPs at most this.")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(
        help="Budget: latency per image at most this many ms on --device (as `dynroute "
             "profile` measured it).")] = None,
    device: Annotated[str | None, typer.Option(
        help="The device key of --max-latency-ms (`dynroute profile` prints it; default: this "
             "machine's, for evaluate.device).")] = None,
    percentile: Annotated[str, typer.Option(
        help="Which latency over the images: p50 or p90.")] = "p90",
    min_miou: Annotated[float | None, typer.Option(help="Also require mIoU at least this.")]
    = None,
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    dataset: Annotated[str | None, typer.Option(
        help="Which dataset's registered model (default: data.dataset).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The most accurate registered front model within a GFLOPs budget, a latency budget on one
    device, or both (exit 1 if none fits)."""
    from dynroute.pipelines.registry_stage import run_select

    if max_gflops is None and max_latency_ms is None:
        raise fail("give a budget: --max-gflops N, --max-latency-ms N, or both")
    if device is not None and max_latency_ms is None:
        raise fail("--device names where a latency budget applies: give --max-latency-ms too")
    p = load_params(params)
    try:
        with tracking_uri(p) as uri:
            chosen, why = run_select(p, uri=uri, max_gflops=max_gflops, min_miou=min_miou,
                                     dataset=dataset, max_latency_ms=max_latency_ms,
                                     device=device, percentile=percentile)
    except _registry_errors() as err:
        raise fail(str(err)) from None
    if chosen is None:
        bounds = [f"mean GFLOPs <= {max_gflops:g}"] if max_gflops is not None else []
        if max_latency_ms is not None:
            bounds.append(f"{percentile} latency <= {max_latency_ms:g} ms")
        if min_miou is not None:
            bounds.append(f"mIoU >= {min_miou:g}")
        raise fail(f"no model on the registered front has {' and '.join(bounds)}"
                   f"{'; ' + why if why else ''}; raise the budget or see the front with "
                   f"`dynroute report`")
    if as_json:
        typer.echo(json.dumps(chosen.to_dict(), indent=2))
        return
    mean, low, high = (_registry_figure(g) for g in
                       (chosen.gflops_mean, chosen.gflops_min, chosen.gflops_max))
    latency = (f"; {chosen.percentile} latency {chosen.latency_ms:.4g} ms on {chosen.device}"
               if chosen.latency_ms is not None else "")
    typer.echo(f"{chosen.name} version {chosen.version}: {chosen.uri}\n"
               f"mIoU {_registry_figure(chosen.miou, '.4f')}, GFLOPs mean {mean} (min {low}, "
               f"max {high}) at {chosen.cost_resolution or '?'}{latency}; trial "
               f"{chosen.trial or '-'}; aliases {', '.join(chosen.aliases) or '-'}")


def profile_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    model: Annotated[str | None, typer.Option(
        help="Profile only this version: models:/NAME/VERSION or models:/NAME@ALIAS (default: "
             "every version on the registered front).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for profile.json and the plot.")]
    = Path("artifacts/profile"),
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the headline here (a DVC metrics file).")] = None,
    device: InferenceDevice = None,
) -> None:
    """Measure the registered front's latency per image on this machine's device and record it on
    each version, under a key naming the device (`dynroute select --max-latency-ms` reads it)."""
    from dynroute.pipelines.profile_stage import run_profile
    from dynroute.platform.evaluate.latency import LatencyDisturbed

    p = with_inference(load_params(params), fast=None, device=device)
    try:
        with tracking_uri(p) as uri:
            run = run_profile(p, uri=uri, out=out, model=model, metrics=metrics,
                              progress=lambda line: typer.echo(line, err=True))
    except (*_registry_errors(), LatencyDisturbed) as err:
        raise fail(str(err)) from None
    typer.echo(f"{run.name} on {run.device}:\n")
    typer.echo(f"{'version':>7}  {'trial':<26}{'mIoU':>8}{'GFLOPs':>9}{'p50 ms':>9}"
               f"{'p90 ms':>9}{'spread':>8}  front")
    for item in sorted(run.profiled, key=lambda i: i.profile.p90_ms):
        v, prof = item.version, item.profile
        typer.echo(f"{v.version:>7}  {(v.trial or '-')[:25]:<26}"
                   f"{_registry_figure(v.miou, '.4f'):>8}{_registry_figure(v.gflops_mean):>9}"
                   f"{prof.p50_ms:>9.4g}{prof.p90_ms:>9.4g}{prof.spread:>8.1%}  "
                   f"{'yes' if v.version in run.front else '-'}")
    d = run.disagreement
    if d["pairs"]:
        typer.echo(f"\nGFLOPs and p90 latency order {d['pairs'] - d['discordant']} of "
                   f"{d['pairs']} version pairs alike (Kendall tau {d['kendall_tau']:.2f})")
    typer.echo(f"summary: {run.summary}; plot: {run.plot}")


def predict_command(
    model: Annotated[str, typer.Option(
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/… or a checkpoint folder.")],
    images: Annotated[list[Path], typer.Argument(help="PNG or JPEG images.")],
    out: Annotated[Path, typer.Option(help="Folder for masks, route drawings and JSON.")]
    = Path("predictions"),
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    dataset: Annotated[str | None, typer.Option(
        help="cityscapes or voc (colours); default from the model's class count.")] = None,
    fast: InferenceFast = None,
    device: InferenceDevice = None,
) -> None:
    """Segment images with a registered model: colour mask + the route each image took."""

    from dynroute.pipelines.registry_stage import run_predict

    p = with_inference(load_params(params), fast=fast, device=device)
    try:
        with tracking_uri(p) as uri:
            result = run_predict(p, model=model, images=images, out=out, uri=uri,
                                 dataset=dataset)
    except _registry_errors() as err:
        raise fail(str(err)) from None
    for row in result.images:
        skipped = f", {len(row.skipped_cells)} cells skipped" if row.skipped_cells else ""
        typer.echo(f"{row.image}: {row.height}x{row.width}, {row.gflops:.4g} GFLOPs, "
                   f"{len(row.open_paths)} open paths{skipped} → {out / row.mask}, "
                   f"{out / row.route}")
    typer.echo(f"summary: {out / 'predictions.json'}")


def convert_command(
    model: Annotated[str, typer.Argument(
        help="The pickled model: models:/NAME/VERSION, models:/NAME@ALIAS, models:/<id> or "
             "runs:/<run>/model.")],
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Required: loading a pickle runs any code it carries.")] = False,
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
) -> None:
    """Re-save a trusted model that an earlier dynroute logged as a pickle, as data (weights
    and config, their SHA-256 recorded); a registered version is replaced by a new version that
    takes over its tags and aliases."""
    from dynroute.platform.registry.convert import convert_model

    p = load_params(params)
    try:
        with tracking_uri(p) as uri:
            done = convert_model(model, tracking_uri=uri, trust_pickle=trust_pickle)
    except _registry_errors() as err:
        raise fail(str(err)) from None
    typer.echo(f"converted {done.source}: logged as data at {done.model_uri}")
    if done.registered is not None:
        typer.echo(f"{done.registered}: version {done.new_version} replaces version "
                   f"{done.old_version} (tagged converted_to={done.new_version}); aliases "
                   f"moved: {', '.join(done.aliases) or 'none'}")
