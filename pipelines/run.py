"""Stage handlers for training and evaluation: params.yaml → library calls → files.

Thin on purpose: they resolve settings (tracking server, checkpoint folders), call
`dynroute.platform.training.train` or `dynroute.platform.evaluation.evaluate`, and write outputs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from dynroute.pipelines.params import Params
from dynroute.platform.files import write_json_atomic
from dynroute.platform.ray_train import CHECKPOINT_PREFIX
from dynroute.platform.training import SPEC_FILE, STATE_FILE, TrackingSpec, TrainSpec


@contextmanager
def tracking_uri(params: Params) -> Iterator[str | None]:
    """The MLflow URI to use; with `tracking.uri: local`, a server on 127.0.0.1 for the block."""
    uri = params.tracking.uri
    if uri == "none":
        yield None
    elif uri == "local":
        from dynroute.platform.tracking import MlflowServer

        with MlflowServer(root=Path(params.tracking.dir)) as server:
            yield server.uri
    else:
        yield uri


def train_spec(params: Params, *, data: str, uri: str | None) -> TrainSpec:
    """The training params.yaml describes: `run.*` keys are TrainSpec fields of the same name."""
    return TrainSpec(
        data=data, model={k: v for k, v in asdict(params.model).items() if k != "route"},
        train=asdict(params.train), **asdict(params.run),
        tracking=TrackingSpec(uri=uri, experiment=params.tracking.experiment,
                              run_name=params.run.name))


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder: `path` itself, or the newest `checkpoint_*` inside a run folder."""
    if (path / STATE_FILE).is_file():
        return path
    found = sorted(p for p in path.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: expected {STATE_FILE} there or in a "
                                f"{CHECKPOINT_PREFIX}* folder; run `dynroute train` first")
    return found[-1]


def load_checkpoint(path: Path):
    """(network in eval mode, its TrainSpec) from a checkpoint folder."""
    import torch

    from dynroute.models import build_network

    folder = find_checkpoint(path)
    spec = TrainSpec.from_dict(json.loads((folder / SPEC_FILE).read_text()))
    network = build_network(spec.network)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    network.load_state_dict(state["model"])
    network.training_run_id = state.get("mlflow_run_id")
    return network.eval(), spec


def load_model(source: str, *, tracking_uri: str | None):
    """(network, its name) from a checkpoint folder or an MLflow model URI (`models:/…`)."""
    if source.startswith(("models:/", "runs:/")):
        from dynroute.platform.model_logging import load_pytorch_model

        if tracking_uri is None:
            raise ValueError(f"{source} is an MLflow model: set tracking.uri to its server")
        network = load_pytorch_model(source, tracking_uri=tracking_uri)
        network.training_run_id = None
        return network.eval(), source
    network, spec = load_checkpoint(Path(source))
    return network, spec.name


def most_frequent_route(result):
    """The route most images took, as a drawable Route (or None when it is not connected:
    a skipped cell passes its input on without an open path, which a Route cannot express)."""
    from dynroute.models import Route, RouteError

    counts = result.route_statistics.route_counts()
    if not counts:
        return None
    paths, _ = counts.most_common(1)[0]
    try:
        return Route(result.route_statistics.route.layers, frozenset(paths),
                     name="most-frequent")
    except RouteError:
        return None


def run_evaluation(params: Params, *, checkpoint: str, data: str, out: Path,
                   metrics: Path | None, uri: str | None, plots: Path | None = None,
                   save_predictions: bool = False):
    """Evaluate a checkpoint on `params.evaluate.split`; write metrics, plots and tables."""
    from dynroute.models.route_statistics import common_x
    from dynroute.pipelines.progress import Progress
    from dynroute.platform.dataset import ShardDataset
    from dynroute.platform.evaluation import TTA, evaluate
    from dynroute.platform.fast_path import inference_device
    from dynroute.platform.plots import plot_gate_probability, plot_route
    from dynroute.platform.shards import read_manifest

    device = inference_device(params.evaluate.device, key="evaluate.device")
    network, source = load_model(checkpoint, tracking_uri=uri)
    manifest = read_manifest(data)
    settings = params.evaluate
    tta = (TTA(scales=settings.tta_scales or (1.0,), flip=settings.tta_flip)
           if settings.tta_scales or settings.tta_flip else None)
    dataset = ShardDataset(root=data, split=settings.split, train=False, crop=None)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(network, dataset, num_classes=manifest.num_classes,
                      class_names=manifest.class_names,
                      cost_resolution=settings.cost_resolution, tta=tta,
                      predictions_dir=out / "predictions" if save_predictions else None,
                      prediction_format=manifest.dataset if save_predictions else None,
                      progress=Progress(f"evaluate {settings.split}"), warmup=1,
                      fast=settings.fast, device=device,
                      loader_workers=settings.loader_workers)
    summary = result.to_dict()
    write_json_atomic(out / "metrics.json", summary)
    if metrics is not None:
        write_json_atomic(metrics, summary)
    result.write_per_image(out / "per_image.parquet")
    tables = {
        "per_class_iou.json": [{"class": name, "iou": iou if iou is not None else 0.0}
                               for name, iou in summary["per_class_iou"].items()],
        "gflops_per_image.json": [{"image": row.id, "gflops": row.gflops}
                                  for row in result.per_image],
    }
    for folder in (out, plots):
        if folder is not None:
            for name, rows in tables.items():
                write_json_atomic(folder / name, rows)
    figures = [plot_gate_probability(result.gate_probability, network.layers,
                                   out / "gate_probability.png")]
    route = most_frequent_route(result) or common_x(result.route_statistics, threshold=0.5,
                                                    name="common-50")
    figures.append(plot_route(route, out / "route.png", title=f"{route.name} route"))
    route.save(out / "route.yaml")
    if uri is not None:
        _track_evaluation(uri, params, source, network.training_run_id, manifest, summary, out,
                          figures)
    return result


def _track_evaluation(uri, params, source, training_run_id, manifest, summary, out,
                      plots) -> None:
    from dynroute.platform.provenance import flatten, git_commit
    from dynroute.platform.tracking import Tracker

    tracker = Tracker(uri=uri, experiment=params.tracking.experiment, enabled=True)
    tags = {"git_commit": git_commit() or "unknown", "data_hash": manifest.content_hash,
            "stage": "evaluate", "model_source": source}
    if training_run_id:
        tags["training_run_id"] = training_run_id
    name = Path(source).name if "://" not in source and ":/" not in source else source
    with tracker.run(run_name=f"evaluate-{name}", tags=tags):
        tracker.log_params(flatten({"evaluate": asdict(params.evaluate), "model": source}))
        numbers = {k: v for k, v in summary.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        tracker.log_metrics(numbers, step=0)
        for path in [*plots, out / "per_image.parquet", out / "per_class_iou.json",
                     out / "route.yaml"]:
            tracker.log_artifact(path)
        tracker.flush()
