"""Choosing a registered model: "the best model under N GFLOPs", or "the most accurate model that
runs in 20 ms at p90 on this machine", answered from the registry.

`select_version` reads the versions `registry.register.register_front` left (through
`registered_versions.read_versions`, their figures from their tags, latency per device included:
`registry/latency.py`) and picks the most accurate one still on the Pareto front within a GFLOPs
budget, a latency budget on one device, or both; `dynroute select` prints it and
`dynroute predict` loads it by its `uri`. The registry itself is the source of truth, so the
answer follows the front as `dynroute register` moves it, without a pareto.json at hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.latency import PERCENTILES, profiled_devices
from dynroute.platform.registry.registered_versions import RegisteredVersion, read_versions

__all__ = ["LatencyBudget", "Selection", "select_version"]


@dataclass(frozen=True)
class LatencyBudget:
    """At most `max_ms` at `percentile` (p50 or p90, over the images) on the device `device`."""

    max_ms: float
    device: str  # a device key (evaluate/latency.py, `device_key`)
    percentile: str = "p90"

    def __post_init__(self) -> None:
        if not self.max_ms > 0 or math.isinf(self.max_ms):
            raise RegistryError(f"max latency {self.max_ms} ms: give a positive number of ms")
        if self.percentile not in PERCENTILES:
            raise RegistryError(f"percentile {self.percentile!r}: use "
                                f"{' or '.join(PERCENTILES)}")

    def measured(self, version: RegisteredVersion) -> float | None:
        """The version's undisturbed figure on the device, or None."""
        figures = version.latency.get(self.device)
        return None if figures is None or figures.disturbed else figures.ms(self.percentile)


@dataclass(frozen=True)
class Selection:
    """The version `select_version` chose."""

    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    miou: float
    gflops_mean: float
    gflops_max: float
    gflops_min: float
    cost_resolution: str | None
    trial: str | None
    aliases: tuple[str, ...]
    device: str | None = None  # with a latency budget: where the latency was measured
    percentile: str | None = None
    latency_ms: float | None = None  # the version's figure there

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else
                (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def select_version(*, tracking_uri: str, name: str, max_gflops: float | None = None,
                   min_miou: float | None = None, latency: LatencyBudget | None = None
                   ) -> Selection | None:
    """The most accurate front version (tag pareto=true) within the budgets given.

    Args:
        tracking_uri: the MLflow server.
        name: the registered model (e.g. `dynroute-cityscapes`).
        max_gflops: mean GFLOPs (the versions' `gflops_mean` tags) at most this.
        min_miou: also require mIoU ≥ this.
        latency: also (or only) require the latency recorded on one device (`dynroute profile`)
            to fit; figures marked disturbed are not used.

    Returns:
        The selection (ties in mIoU: the cheaper, then the older version), or None when no front
        version fits (`why_none` says what comes closest).

    Raises:
        RegistryError: the model is not registered, no budget or a bound that is not a number,
            or no front version was profiled on the latency budget's device.
    """
    if max_gflops is None and latency is None:
        raise RegistryError("give a budget: max GFLOPs, a max latency, or both")
    if (max_gflops is not None and math.isnan(max_gflops)) or (
            min_miou is not None and math.isnan(min_miou)):
        raise RegistryError(f"bounds must be numbers, got max_gflops={max_gflops}, "
                            f"min_miou={min_miou}")
    registered, candidates = _front_versions(tracking_uri, name, latency)

    def fits(v: RegisteredVersion) -> bool:
        return ((max_gflops is None or v.gflops_mean <= max_gflops)
                and (min_miou is None or v.miou >= min_miou)
                and (latency is None or latency.measured(v) <= latency.max_ms))

    chosen = [v for v in candidates if fits(v)]
    if not chosen:
        return None
    best = min(chosen, key=lambda v: (-v.miou, latency.measured(v) if latency else 0.0,
                                      v.gflops_mean, int(v.version)))
    return Selection(name=registered, version=best.version,
                     uri=f"models:/{registered}/{best.version}", miou=best.miou,
                     gflops_mean=best.gflops_mean, gflops_max=best.gflops_max,
                     gflops_min=best.gflops_min, cost_resolution=best.cost_resolution,
                     trial=best.trial, aliases=best.aliases,
                     device=latency.device if latency else None,
                     percentile=latency.percentile if latency else None,
                     latency_ms=latency.measured(best) if latency else None)


def why_none(*, tracking_uri: str, name: str, latency: LatencyBudget) -> str:
    """What comes closest to a latency budget nothing fits: the fastest front version there."""
    _, candidates = _front_versions(tracking_uri, name, latency)
    fastest = min(candidates, key=lambda v: (latency.measured(v), -v.miou))
    return (f"the fastest front version on {latency.device} is version {fastest.version} at "
            f"{latency.measured(fastest):.4g} ms {latency.percentile} (mIoU {fastest.miou:.4f})")


def _front_versions(tracking_uri: str, name: str, latency: LatencyBudget | None
                    ) -> tuple[str, list[RegisteredVersion]]:
    """The model's name as registered, and its front versions with a figure to judge (an
    undisturbed latency on the budget's device, when there is one)."""
    if "{" in name or "'" in name:
        raise RegistryError(f"registered model name {name!r}: give the concrete name (fill "
                            f"{{dataset}} with model_name) without quotes")
    registered, versions = read_versions(tracking_uri=tracking_uri, name=name)
    front = [v for v in versions if v.pareto and math.isfinite(v.miou)]
    if latency is None:
        return registered, front
    profiled = [v for v in front if latency.measured(v) is not None]
    if not profiled:
        known = profiled_devices(front)
        disturbed = [v.version for v in front if latency.device in v.latency]
        reason = (f"its figures there (versions {', '.join(disturbed)}) were disturbed by another "
                  f"job" if disturbed else "no front version was profiled on it")
        raise RegistryError(
            f"no latency of {registered} on device {latency.device}: {reason}. Profile the front "
            f"on that machine with `dynroute profile`; devices profiled: "
            f"{', '.join(known) or 'none yet'}")
    return registered, profiled
