"""Stage handlers of the Pareto-aware registry: params.yaml → `platform.registry` → files.

`run_register` is the `register` DVC stage (pareto.json → registered versions, registry.json, and
its headline for DVC); `run_select` and `run_predict` back the `dynroute select` and
`dynroute predict` commands.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dynroute.platform.config.params import Params
from dynroute.platform.device.fast_path import inference_device
from dynroute.platform.evaluate.latency import device_key
from dynroute.platform.evaluate.predict import CLASSES, PredictError, Prediction, predict
from dynroute.platform.files import write_json_atomic
from dynroute.platform.registry.front import RegistryError, model_name
from dynroute.platform.registry.register import RegistryState, register_front
from dynroute.platform.registry.selection import (
    LatencyBudget,
    Selection,
    select_version,
    why_none,
)
from dynroute.platform.train.checkpoints import load_model


def _require(uri: str | None) -> str:
    if uri is None:
        raise RegistryError("the model registry lives in MLflow but tracking.uri is 'none'; set "
                            "it to 'local' or a tracking server's URI in params.yaml")
    return uri


def run_register(params: Params, *, pareto: Path, uri: str | None, out: Path,
                 metrics: Path | None = None) -> RegistryState:
    """Register the front of `pareto` (pareto.json) and write the summary to `out` atomically,
    its headline (`headline`) to `metrics`."""
    state = register_front(pareto, tracking_uri=_require(uri), name=params.registry.name,
                           budget_edges=params.registry.budget_edges)
    state.write(out)
    if metrics is not None:
        write_json_atomic(metrics, headline(state))
    return state


def headline(state: RegistryState) -> dict:
    """The registry in two figures (the DVC metrics file): versions on the front, and which
    version the `knee` alias names; the versions, aliases and description are in the summary."""
    return {"versions_on_front": sum(v.pareto for v in state.versions),
            "knee_version": state.aliases.get("knee")}


def run_select(params: Params, *, uri: str | None, max_gflops: float | None,
               min_miou: float | None = None, dataset: str | None = None,
               max_latency_ms: float | None = None, device: str | None = None,
               percentile: str = "p90") -> tuple[Selection | None, str | None]:
    """The best front version within the budgets, or None and what comes closest to the latency
    budget (None without one).

    The registered model is `registry.name` filled with `dataset` (default `data.dataset`); a
    latency budget's device defaults to this machine's (`evaluate.device`, torch's threads).
    """
    name = model_name(params.registry.name, dataset or params.data.dataset)
    latency = None
    if max_latency_ms is not None:
        latency = LatencyBudget(max_ms=max_latency_ms, percentile=percentile, device=device or
                                device_key(inference_device(params.evaluate.device,
                                                            key="evaluate.device")))
    chosen = select_version(tracking_uri=_require(uri), name=name, max_gflops=max_gflops,
                            min_miou=min_miou, latency=latency)
    why = (why_none(tracking_uri=uri, name=name, latency=latency)
           if chosen is None and latency is not None else None)
    return chosen, why


def infer_dataset(num_classes: int) -> str:
    """The dataset a network of `num_classes` outputs was trained on (19 Cityscapes, 21 VOC)."""
    for dataset, classes in CLASSES.items():
        if classes == num_classes:
            return dataset
    raise PredictError(f"a network with {num_classes} classes matches no known dataset "
                        f"({', '.join(f'{d}: {c}' for d, c in CLASSES.items())}); pass --dataset")


def run_predict(params: Params, *, model: str, images: Sequence[Path], out: Path,
                uri: str | None, dataset: str | None = None) -> Prediction:
    """Load `model` (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/… or a checkpoint folder)
    and write a colour mask, a route drawing and predictions.json for `images` into `out`.

    `dataset` defaults to the one the network's class count implies; the model carries its own
    configuration, `params` gives the device and the fast path (evaluate.device, evaluate.fast).
    """
    device = inference_device(params.evaluate.device, key="evaluate.device")
    network, source = load_model(model, tracking_uri=uri)
    return predict(network.to(device), list(images), out,
                   dataset=dataset or infer_dataset(network.num_classes), model=source,
                   fast=params.evaluate.fast)
