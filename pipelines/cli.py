"""The `dynroute` command. Handlers parse arguments, call one library function and print.

Each handler imports its stage module (pipelines/run.py, tune_stage.py, …) inside the function: a
stage loads MLflow, Ray or matplotlib (seconds each), and `dynroute --help` or `dynroute model
summary` should not wait for what they do not use.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from dynroute.pipelines import cli_model, cli_registry
from dynroute.pipelines.cli_common import (
    CommandGroup,
    InferenceDevice,
    InferenceFast,
    fail,
    load_params,
    on_interrupt,
    set_debug,
    tracking_uri,
    with_inference,
)
from dynroute.pipelines.prepare import data_metrics, prepare
from dynroute.pipelines.progress import Progress
from dynroute.pipelines.synth import synthesize
from dynroute.platform.config.params import ParamsError
from dynroute.platform.config.params import load_params as read_params
from dynroute.platform.config.settings import Settings
from dynroute.platform.files import write_json_atomic
from dynroute.platform.tracking.server import MlflowServer, MlflowServerError
from dynroute.platform.url_secrets import SettingsError

# CommandGroup (cli_common.py) is the top level around every command: stop signals, errors of the
# operating system and of services, --debug. Locals stay out of a traceback: they hold secrets.
app = typer.Typer(no_args_is_help=True, add_completion=False, cls=CommandGroup,
                  pretty_exceptions_show_locals=False,
                  help="Dynamic routing for semantic segmentation: model, data, training, "
                       "search. Ctrl-C, SIGTERM and SIGHUP stop any command cleanly (exit status "
                       "130, 143, 129) and say how to continue.")
model_app = typer.Typer(no_args_is_help=True, cls=CommandGroup,
                        help="The network: routes, sizes and costs.")
data_app = typer.Typer(no_args_is_help=True, cls=CommandGroup,
                       help="Datasets: synthesize, prepare into shards.")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")


@app.callback()
def main(
    debug: Annotated[bool, typer.Option(
        "--debug", envvar="DYNROUTE_DEBUG",
        help="Show the traceback behind an error (also DYNROUTE_DEBUG=1).")] = False,
) -> None:
    """The options of every command (the app's help is Typer(help=...) above)."""
    set_debug(debug)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the raw dataset into.")],
    dataset: Annotated[str, typer.Option(help="cityscapes or voc.")] = "cityscapes",
    train: Annotated[int, typer.Option(help="Training images (VOC: segmentation train).")] = 64,
    val: Annotated[int, typer.Option(help="Validation images.")] = 16,
    height: Annotated[int, typer.Option(help="Image height.")] = 256,
    width: Annotated[int, typer.Option(help="Image width.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives the same files.")] = 0,
) -> None:
    """Write a synthetic dataset in the real on-disk format of Cityscapes or VOC 2012 + SBD."""
    try:
        summary = synthesize(dataset, out, train=train, val=val, height=height, width=width,
                             seed=seed, progress=Progress(f"synth {dataset}"))
    except ValueError as err:
        raise fail(str(err)) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@data_app.command("prepare")
def data_prepare(
    dataset: Annotated[str, typer.Option(help="cityscapes or voc.")],
    raw: Annotated[Path, typer.Option(help="The raw dataset folder.")],
    out: Annotated[Path, typer.Option(help="Folder for shards, manifest and class stats.")],
    rows_per_shard: Annotated[int, typer.Option(help="Images per Parquet file.")] = 500,
    rows_per_group: Annotated[int, typer.Option(help="Images per row group.")] = 2,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: cores).")]
    = None,
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the dataset, class count and images per split here (a DVC metrics "
             "file); class statistics are in the prepared folder.")] = None,
) -> None:
    """Validate a raw Cityscapes or VOC+SBD folder and write Parquet shards, atomically."""
    bars: dict[str, Progress] = {}

    def progress(split: str, done: int, total: int) -> None:
        bars.setdefault(split, Progress(f"prepare {dataset} {split}"))(done, total)

    on_interrupt(f"{out} is unchanged (the partial copy was removed); run the same command "
                 f"again")
    try:
        manifest = prepare(dataset, raw, out, rows_per_shard=rows_per_shard,
                           rows_per_group=rows_per_group, workers=workers, progress=progress)
    except ValueError as err:
        raise fail(str(err)) from None
    if metrics is not None:
        write_json_atomic(metrics, data_metrics(out))
    counts = ", ".join(f"{split} {manifest.count(split)}" for split in manifest.splits)
    typer.echo(f"prepared {dataset} into {out}: {counts} images; content hash "
               f"{manifest.content_hash[:16]}")


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option(help="Prepared dataset (path or s3:// URI).")],
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    storage: Annotated[str | None, typer.Option(help="Override run.storage.")] = None,
    name: Annotated[str | None, typer.Option(help="Override run.name.")] = None,
    workers: Annotated[int | None, typer.Option(help="Override run.workers.")] = None,
    iterations: Annotated[int | None, typer.Option(help="Override train.iterations.")] = None,
    budget: Annotated[str | None, typer.Option(
        help="Override train.budget: dynamic-a/b/c, dynamic-raw, network-fix.")] = None,
    fast: Annotated[bool | None, typer.Option(
        "--fast/--no-fast", help="Override run.fast: the device's measured fast path "
                                 "(channels-last; on one GPU the step as a CUDA graph) or the "
                                 "plain fp32 layout.")] = None,
) -> None:
    """Train the network on Ray Train (in-process with 0 workers), tracked in MLflow."""
    from dynroute.pipelines.run import train_spec
    from dynroute.platform.train.checkpoints import RunBusy, run_dir
    from dynroute.platform.train.training import train

    p = load_params(params)
    try:
        p = replace(p, run=replace(p.run, **{k: v for k, v in
                                             {"storage": storage, "name": name,
                                              "workers": workers,
                                              "fast": fast}.items() if v is not None}),
                    train=replace(p.train, **{k: v for k, v in
                                              {"iterations": iterations,
                                               "budget": budget}.items() if v is not None}))
        on_interrupt(f"the run folder {run_dir(train_spec(p, data=str(data), uri=None))} keeps "
                     f"its checkpoints (one every {p.run.checkpoint_every} steps); run the same "
                     f"command again to continue from the last one")
        with tracking_uri(p) as uri:
            result = train(train_spec(p, data=str(data), uri=uri))
    except (ValueError, FileNotFoundError, RunBusy) as err:
        raise fail(str(err)) from None
    typer.echo(f"trained: {result.metrics.get('step')} steps, checkpoint {result.checkpoint}")


@app.command("evaluate")
def evaluate_command(
    checkpoint: Annotated[str, typer.Option(
        help="A checkpoint, a training run folder, or an MLflow model URI (models:/NAME@ALIAS).")],
    data: Annotated[Path, typer.Option(help="Prepared dataset (path or s3:// URI).")],
    out: Annotated[Path, typer.Option(help="Folder for metrics, tables and plots.")],
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the headline (mIoU, pixel accuracy, GFLOPs mean and p90) here (a DVC "
             "metrics file); the full summary is OUT/metrics.json.")] = None,
    plots: Annotated[Path | None, typer.Option(
        help="Also write the per-class IoU and per-image GFLOPs tables here (DVC plots).")]
    = None,
    save_predictions: Annotated[bool, typer.Option(
        help="Write predictions (Cityscapes: label-id PNGs for the official scripts).")] = False,
    fast: InferenceFast = None,
    device: InferenceDevice = None,
) -> None:
    """mIoU, per-class IoU, real GFLOPs per image, gate usage and latency of a checkpoint (the
    latency withheld when another job disturbed the timing; `dynroute profile` measures it)."""
    from dynroute.pipelines.report import kind_lines
    from dynroute.pipelines.run import run_evaluation

    p = with_inference(load_params(params), fast=fast, device=device)
    try:
        with tracking_uri(p) as uri:
            result = run_evaluation(p, checkpoint=checkpoint, data=str(data), out=out,
                                    metrics=metrics, plots=plots, uri=uri,
                                    save_predictions=save_predictions)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    g = result.gflops
    typer.echo(f"mIoU {result.miou:.4f}, pixel accuracy {result.pixel_accuracy:.4f}, "
               f"GFLOPs mean {g.mean:.3f} (min {g.min:.3f}, p50 {g.p50:.3f}, max {g.max:.3f}) "
               f"at {result.cost_resolution[0]}x{result.cost_resolution[1]}; {out}")
    for line in kind_lines(result.by_kind()):
        typer.echo(line)
    typer.echo(result.latency_line())


@app.command("pareto")
def pareto_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    trials: Annotated[Path | None, typer.Option(
        help="The study's trials (default: {tune.results}/trials.json).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for pareto.json and pareto.csv.")]
    = Path("artifacts/pareto"),
    plots: Annotated[Path, typer.Option(help="Folder for pareto.png and pareto.html.")]
    = Path("artifacts/pareto"),
    metrics: Annotated[Path | None, typer.Option(
        help="Also write the headline (hypervolume, front size, the knee's figures) here (a DVC "
             "metrics file).")] = None,
) -> None:
    """The Pareto front of the budget search (mIoU vs real GFLOPs), its knee and hypervolume."""
    from dynroute.pipelines.pareto_stage import TrialsError, format_table, run_pareto

    p = load_params(params)
    trials = trials or Path(p.tune.results) / "trials.json"
    try:
        with tracking_uri(p) as uri:
            outputs = run_pareto(p, trials=trials, out=out, plots=plots, uri=uri,
                                 metrics=metrics)
    except (TrialsError, ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    typer.echo(format_table(outputs))
    typer.echo(f"written: {', '.join(str(f) for f in outputs.files.values())}")


@app.command("report")
def report_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    artifacts: Annotated[Path, typer.Option(
        help="The pipeline's artifacts folder (eval/, pareto/, registry.json).")]
    = Path("artifacts"),
) -> None:
    """What the main job produced: evaluation, Pareto front, registered versions, the UI."""
    from dynroute.pipelines.report import report

    typer.echo(report(load_params(params), artifacts=artifacts))


@app.command("settings")
def settings_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
) -> None:
    """Every endpoint this run would use (Ray, storage, MLflow, S3, Optuna, DVC), secrets masked,
    and where each came from."""
    try:
        typer.echo(Settings.render(read_params(params)).describe())
    except (ParamsError, SettingsError) as err:
        raise fail(str(err)) from None


@app.command("ui")
def ui_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Serve the MLflow UI over the local tracking store (tracking.uri: local) until Ctrl-C."""
    # Lazy, as the stage modules are (module docstring): the tracker loads MLflow.
    from dynroute.platform.tracking.tracker import experiment_page

    p = load_params(params)
    if p.tracking.uri != "local":
        raise fail(f"tracking.uri is {p.tracking.uri!r}: open that server's UI instead")
    try:
        with MlflowServer(root=Path(p.tracking.dir), port=port) as server:
            typer.echo(f"MLflow UI at {server.uri} (Ctrl-C stops it)")
            page = experiment_page(server.uri, p.tracking.experiment)
            if page is not None:
                typer.echo(f"the runs of experiment '{p.tracking.experiment}' (Model training "
                           f"view): {page}")
            while server.running:
                time.sleep(1)
    except MlflowServerError as err:
        raise fail(str(err)) from None
    except KeyboardInterrupt:
        pass


# === model: dynroute model summary / route (pipelines/cli_model.py) ===========================
model_app.command("summary")(cli_model.model_summary)
model_app.command("route")(cli_model.model_route)

# === registry: dynroute register / select / predict (pipelines/cli_registry.py) =============
app.command("register")(cli_registry.register_command)
app.command("select")(cli_registry.select_command)
app.command("profile")(cli_registry.profile_command)
app.command("predict")(cli_registry.predict_command)
model_app.command("convert")(cli_registry.convert_command)
# === end of the registry block ===============================================================


# === tune: dynroute tune (the budget search) =================================================
# Handler in dynroute.pipelines.tune_stage; library in dynroute.platform.search (tune, study, trial,
# mo_asha).


@app.command("tune")
def tune_command(
    params: Annotated[Path, typer.Option(help="The params file.")] = Path("params.yaml"),
    resume: Annotated[bool, typer.Option(
        help="Continue the study after an interruption: finished trials are kept, interrupted "
             "ones resume from their checkpoints.")] = False,
    num_samples: Annotated[int | None, typer.Option(
        help="Override tune.num_samples (trials in all, earlier sessions included).")] = None,
    data: Annotated[Path | None, typer.Option(
        help="Prepared dataset (default: data.prepared).")] = None,
) -> None:
    """Budget search: Optuna samples λ2, μ; Ray Tune trains and evaluates each trial; the
    mIoU-vs-GFLOPs trials go to {tune.results}/trials.json (see the pareto stage)."""
    from dynroute.pipelines.tune_stage import run_tune

    p = load_params(params)
    if num_samples is not None:
        p = replace(p, tune=replace(p.tune, num_samples=num_samples))
    on_interrupt(f"study {p.tune.study} keeps its finished trials; `dynroute tune --resume` "
                 f"continues it, interrupted trials from their checkpoints")
    try:
        with tracking_uri(p) as uri:
            path = run_tune(p, data=str(data or p.data.prepared), uri=uri, resume=resume)
    except (ValueError, FileNotFoundError) as err:
        raise fail(str(err)) from None
    trials = json.loads(path.read_text())["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAILED")}
    typer.echo(f"study {p.tune.study}: {len(trials)} trials "
               f"({', '.join(f'{n} {s.lower()}' for s, n in states.items())}); {path}")
# === end of the tune block ===================================================================
