"""`params.yaml`, the single source of truth for every stage, as frozen dataclasses.

The sections are the dataclasses of the rooms that use them, declared once: `model` is
models.NetworkConfig, `train` train/recipe.py's TrainConfig, `run` train/spec.py's RunSettings
(which TrainSpec inherits), `tune` search/study.py's TuneSettings (which SearchSpec inherits),
`profile` evaluate/latency.py's LatencySettings (which the search's latency cost uses too).
The sections only the stages read (synth, data, evaluate, tracking, registry) live here.

Unknown keys are refused with the key's full name, so a typo never silently falls back to a
default. DVC stages read their values through `dvc.yaml` templating (`${data.raw}`) and depend on
the individual keys; Python code loads the same file through `load_params`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dynroute.models import NetworkConfig
from dynroute.platform.evaluate.latency import LatencySettings
from dynroute.platform.search.study import TuneSettings
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import RunSettings


class ParamsError(ValueError):
    """params.yaml that does not fit the schema; the message names the key."""


@dataclass(frozen=True)
class SynthParams:
    """The embedded synthetic dataset (`dynroute data synth`)."""

    dataset: str = "cityscapes"
    train: int = 64
    val: int = 16
    height: int = 256
    width: int = 512
    seed: int = 0


@dataclass(frozen=True)
class DataParams:
    """Which raw folder to prepare and how to shard it (`dynroute data prepare`).

    `raw` points at the synthetic folder by default; for the real data set it to the folder that
    holds leftImg8bit/ and gtFine/ (Cityscapes) or VOCdevkit/ and benchmark_RELEASE/ (VOC).
    """

    dataset: str = "cityscapes"
    raw: str = "data/raw/synthetic"
    prepared: str = "data/prepared"
    rows_per_shard: int = 500
    rows_per_group: int = 2


@dataclass(frozen=True)
class EvaluateParams:
    split: str = "val"
    cost_resolution: tuple[int, int] = (1024, 2048)  # declared resolution of reported GFLOPs
    tta_scales: tuple[float, ...] = ()  # e.g. [0.75, 1.0, 1.25]; empty: single scale
    tta_flip: bool = False
    fast: bool = True  # the device's measured fast path (platform/fast_path.py)
    device: str = "auto"  # auto: the GPU when torch sees one; cpu, cuda, cuda:N
    loader_workers: int | None = None  # None: fast_path.loader_workers (CUDA: cores per GPU)


@dataclass(frozen=True)
class TrackingParams:
    """`uri: local` runs an MLflow server (sqlite, 127.0.0.1) for the command's duration over
    `dir`; `none` turns tracking off; anything else is a tracking server URI."""

    uri: str = "local"
    dir: str = "mlruns"
    experiment: str = "dynroute"


@dataclass(frozen=True)
class RegistryParams:
    """The Pareto-aware model registry (`dynroute register`)."""

    name: str = "dynroute-{dataset}"  # one registered model per dataset
    budget_edges: tuple[float, ...] = ()  # GFLOPs edges of the le-N aliases; empty: automatic


@dataclass(frozen=True)
class Params:
    synth: SynthParams = field(default_factory=SynthParams)
    data: DataParams = field(default_factory=DataParams)
    model: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunSettings = field(default_factory=RunSettings)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)
    tune: TuneSettings = field(default_factory=TuneSettings)
    registry: RegistryParams = field(default_factory=RegistryParams)
    profile: LatencySettings = field(default_factory=LatencySettings)


def _build(cls: type, data: object, where: str):
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
        raise ParamsError(f"unknown key(s) {keys}; known: {', '.join(sorted(known))}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key)
        else:
            values[name] = _check_type(value, hint, key)
    return cls(**values)


def _check_type(value: object, hint: object, key: str) -> object:
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key} = {value!r}: expected a list")
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ParamsError(f"{key} = {value!r}: expected {len(items)} values")
        return tuple(_check_type(v, t, f"{key}[{i}]") for i, (v, t) in
                     enumerate(zip(value, items, strict=True)))
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(isinstance(value, t) and not (t is int and isinstance(value, bool))
               for t in allowed if isinstance(t, type)):
        names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
        raise ParamsError(f"{key} = {value!r}: expected {names}")
    return value


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ParamsError(f"cannot read {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    if data is None:  # an empty file (or only comments): every value would be a code default
        raise ParamsError(f"{path} is empty: it must hold the sections to run with (see the "
                          f"repository's params.yaml); a truncated or blanked file is not read "
                          f"as 'all defaults'")
    try:
        return _build(Params, data, "")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    except ValueError as err:  # a section's own check (e.g. an unknown budget name)
        raise ParamsError(f"{path}: {err}") from None
