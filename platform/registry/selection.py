"""Choosing a registered model: "the best model under N GFLOPs", answered from the registry.

`select_version` reads the versions `registry.register.register_front` left (through
`registered_versions.read_versions`, their figures from their tags) and picks the most accurate
one still on the Pareto front within a GFLOPs budget; `dynroute select` prints it and
`dynroute predict` loads it by its `uri`. The registry itself is the source of truth, so the
answer follows the front as `dynroute register` moves it, without a pareto.json at hand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.registered_versions import read_versions

__all__ = ["Selection", "select_version"]


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

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else
                (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def select_version(*, tracking_uri: str, name: str, max_gflops: float,
                   min_miou: float | None = None) -> Selection | None:
    """The most accurate front version (tag pareto=true) with mean GFLOPs ≤ max_gflops.

    Args:
        tracking_uri: the MLflow server.
        name: the registered model (e.g. `dynroute-cityscapes`).
        max_gflops: the budget, in the GFLOPs of the versions' `gflops_mean` tags.
        min_miou: also require mIoU ≥ this.

    Returns:
        The selection (ties in mIoU: fewer GFLOPs, then the older version), or None when no
        front version fits.

    Raises:
        RegistryError: the model is not registered, or a bound is not a number.
    """
    if math.isnan(max_gflops) or (min_miou is not None and math.isnan(min_miou)):
        raise RegistryError(f"bounds must be numbers, got max_gflops={max_gflops}, "
                            f"min_miou={min_miou}")
    if "{" in name or "'" in name:
        raise RegistryError(f"registered model name {name!r}: give the concrete name (fill "
                            f"{{dataset}} with model_name) without quotes")
    registered, candidates = read_versions(tracking_uri=tracking_uri, name=name)
    fits = [v for v in candidates if v.pareto and math.isfinite(v.miou)
            and v.gflops_mean <= max_gflops and (min_miou is None or v.miou >= min_miou)]
    if not fits:
        return None
    best = min(fits, key=lambda v: (-v.miou, v.gflops_mean, int(v.version)))
    return Selection(name=registered, version=best.version,
                     uri=f"models:/{registered}/{best.version}", miou=best.miou,
                     gflops_mean=best.gflops_mean, gflops_max=best.gflops_max,
                     gflops_min=best.gflops_min, cost_resolution=best.cost_resolution,
                     trial=best.trial, aliases=best.aliases)
