"""Stage handlers for training and evaluation: params.yaml → library calls → files.

Thin on purpose: they resolve settings (the training spec, checkpoint folders), call
`dynroute.platform.train.training.train` or `dynroute.platform.evaluate.evaluation.evaluate`,
and write outputs.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from dynroute.models import Route, RouteError
from dynroute.models.route_statistics import common_x
from dynroute.pipelines.progress import Progress
from dynroute.platform import metrics as M
from dynroute.platform.config.params import Params
from dynroute.platform.data.dataset import ShardDataset
from dynroute.platform.data.shards import read_manifest, read_scene_kinds
from dynroute.platform.device.fast_path import inference_device
from dynroute.platform.evaluate.evaluation import TTA, evaluate
from dynroute.platform.evaluate.plots import plot_gate_probability, plot_route
from dynroute.platform.evaluate.results import EvaluationLatency
from dynroute.platform.files import write_json_atomic
from dynroute.platform.tracking import runs
from dynroute.platform.train.checkpoints import load_model
from dynroute.platform.train.spec import TrackingSpec, TrainSpec

# What the evaluate stage's DVC metrics file holds: the figures `dvc exp show` compares across
# experiments. The full summary (per-class IoU, gate probabilities, latency, …) is the stage's
# out `metrics.json` beside the tables and figures.
EVALUATION_HEADLINE = (M.MIOU, M.PIXEL_ACCURACY, M.GFLOPS_MEAN, M.GFLOPS_P90)


def train_spec(params: Params, *, data: str, uri: str | None) -> TrainSpec:
    """The training params.yaml describes: the `run:` section's settings, the network and the
    recipe, tracked under `run.name`."""
    return TrainSpec.for_run(
        params.run, data=data, model=params.model, train=params.train,
        tracking=TrackingSpec(uri=uri, experiment=params.tracking.experiment,
                              run_name=params.run.name))


def most_frequent_route(result):
    """The route most images took, as a drawable Route (or None when it is not connected:
    a skipped cell passes its input on without an open path, which a Route cannot express)."""
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
    device = inference_device(params.evaluate.device, key="evaluate.device")
    network, source = load_model(checkpoint, tracking_uri=uri)
    manifest = read_manifest(data)
    settings = params.evaluate
    tta = (TTA(scales=settings.tta_scales or (1.0,), flip=settings.tta_flip)
           if settings.tta_scales or settings.tta_flip else None)
    dataset = ShardDataset(root=data, split=settings.split, train=False, crop=None, verify=True)
    out.mkdir(parents=True, exist_ok=True)
    result = evaluate(network, dataset, num_classes=manifest.num_classes,
                      class_names=manifest.class_names,
                      cost_resolution=settings.cost_resolution, tta=tta,
                      predictions_dir=out / "predictions" if save_predictions else None,
                      prediction_format=manifest.dataset if save_predictions else None,
                      progress=Progress(f"evaluate {settings.split}"), warmup=1,
                      fast=settings.fast, device=device,
                      loader_workers=settings.loader_workers,
                      scene_kinds=read_scene_kinds(data, settings.split))
    summary = result.to_dict()
    write_json_atomic(out / "metrics.json", summary)
    if metrics is not None:
        write_json_atomic(metrics, {k: summary[k] for k in EVALUATION_HEADLINE})
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
                          figures, latency=result.latency)
    return result


def _track_evaluation(uri, params, source, training_run_id, manifest, summary, out,
                      plots, *, latency: EvaluationLatency | None = None) -> None:
    """The run's figures are the summary's numbers: a disturbed latency's are null there, so
    MLflow gets none, and the tags say what it was measured on and why it was withheld."""
    tags = runs.provenance_tags(data_hash=manifest.content_hash) | {
        "stage": "evaluate", "model_source": source}
    if latency is not None:
        tags |= {"latency_device": latency.key, M.LATENCY_DISTURBED: str(latency.disturbed).lower()}
        if latency.disturbed:
            tags["latency_reason"] = latency.disturbance.reason
    if training_run_id:
        tags["training_run_id"] = training_run_id
    name = Path(source).name if "://" not in source and ":/" not in source else source
    numbers = {k: v for k, v in summary.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    runs.log_evaluation_run(
        uri, params.tracking.experiment, run_name=f"evaluate-{name}", tags=tags,
        params={"evaluate": asdict(params.evaluate), "model": source}, metrics=numbers,
        artifacts=[*plots, out / "per_image.parquet", out / "per_class_iou.json",
                   out / "route.yaml"])
