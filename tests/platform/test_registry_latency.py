"""Latency per device in the registry, the pure half: the version tag's format, the front per
device and how far the GFLOPs and latency orders disagree. (`select` against a real server, with
figures set on registered versions, is in tests/pipelines/test_registry_cli.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from dynroute.platform.evaluate.latency import device_key
from dynroute.platform.registry.front import RegistryError
from dynroute.platform.registry.latency import (
    LATENCY_TAG_PREFIX,
    latency_front,
    latency_tag,
    order_disagreement,
    parse_latency_tags,
    profiled_devices,
)
from dynroute.platform.registry.registered_versions import RegisteredVersion
from dynroute.platform.registry.selection import LatencyBudget

CPU, GPU = "cpu-xeon-2t-torch-2.13.0", "cuda-nvidia-h200-torch-2.13.0"


def figures(p50: float, p90: float, *, disturbed: bool = False) -> dict:
    return {"p50_ms": p50, "p90_ms": p90, "mean_ms": (p50 + p90) / 2, "spread": 0.02,
            "disturbed": disturbed, "threads": 2, "resolution": [256, 512],
            "per_image_ms": [p50, p90]}


def version(number: int, miou: float, gflops: float, latency: dict[str, dict], *,
            pareto: bool = True) -> RegisteredVersion:
    tags = dict(latency_tag(device, record) for device, record in latency.items())
    return RegisteredVersion(version=str(number), trial=f"t{number}", study="s", run_id=None,
                             miou=miou, gflops_mean=gflops, gflops_max=gflops, gflops_min=gflops,
                             cost_resolution="256x512", pareto=pareto, pareto_rank="0",
                             aliases=(), latency=parse_latency_tags(tags))


def test_a_latency_tag_names_its_device_and_reads_back_without_the_per_image_list():
    key, value = latency_tag(CPU, figures(20.0, 30.0))
    assert key == LATENCY_TAG_PREFIX + CPU
    record = json.loads(value)
    assert "per_image_ms" not in record and record["resolution"] == [256, 512]
    read = parse_latency_tags({key: value, "pareto": "true"})
    assert list(read) == [CPU]
    assert (read[CPU].p50_ms, read[CPU].p90_ms, read[CPU].disturbed) == (20.0, 30.0, False)
    assert read[CPU].ms("p90") == 30.0 and read[CPU].details["threads"] == 2
    with pytest.raises(RegistryError, match="p50 or p90"):
        read[CPU].ms("p99")
    with pytest.raises(ValueError, match="p90_ms"):
        latency_tag(CPU, {"p50_ms": 1.0, "mean_ms": 1.0})


@pytest.mark.parametrize("value", ["{not json", json.dumps({"p50_ms": 1.0}),
                                   json.dumps({"p50_ms": "fast", "p90_ms": 1, "mean_ms": 1}),
                                   json.dumps({"p50_ms": float("nan"), "p90_ms": 1,
                                               "mean_ms": 1}),
                                   json.dumps({"p50_ms": 0, "p90_ms": 1, "mean_ms": 1})])
def test_a_damaged_latency_tag_is_not_read_as_a_figure(value):
    assert parse_latency_tags({LATENCY_TAG_PREFIX + CPU: value}) == {}


def test_the_device_key_says_processor_threads_and_torch():
    key = device_key("cpu", threads=3)
    assert key.startswith("cpu-") and "-3t-torch-" in key
    assert key != device_key("cpu", threads=1)  # another thread count is another device
    assert all(c.isalnum() or c in ".-" for c in key) and key == key.lower()
    assert torch.__version__.split("+")[0] in key


def test_each_device_has_its_own_front_among_the_gflops_front():
    versions = [
        version(1, 0.50, 2.0, {CPU: figures(10, 12), GPU: figures(2.0, 2.2)}),
        version(2, 0.60, 5.0, {CPU: figures(30, 40), GPU: figures(1.5, 1.8)}),  # fast on GPU
        version(3, 0.64, 12.0, {CPU: figures(25, 35)}),  # beats 2 on the CPU
        version(4, 0.70, 20.0, {CPU: figures(5, 6)}, pareto=False),  # off the GFLOPs front
        version(5, 0.80, 20.0, {CPU: figures(5, 6, disturbed=True)}),  # not a figure to trust
    ]
    assert [v.version for v in latency_front(versions, CPU)] == ["1", "3"]
    assert [v.version for v in latency_front(versions, GPU)] == ["2"]  # faster and better
    assert latency_front(versions, "never-profiled") == []
    assert profiled_devices(versions) == sorted([CPU, GPU])
    # p50 can order them differently from p90
    close = [version(1, 0.5, 2.0, {CPU: figures(10, 50)}), version(2, 0.6, 5.0, {CPU: figures(
        20, 30)})]
    assert [v.version for v in latency_front(close, CPU, percentile="p90")] == ["2"]
    assert [v.version for v in latency_front(close, CPU, percentile="p50")] == ["1", "2"]


def test_order_disagreement_counts_the_pairs_ranked_oppositely():
    assert order_disagreement([(1, 10), (2, 20), (3, 30)]) == {
        "pairs": 3, "discordant": 0, "kendall_tau": 1.0}
    assert order_disagreement([(1, 30), (2, 20), (3, 10)])["kendall_tau"] == -1.0
    mixed = order_disagreement([(1, 10), (2, 30), (3, 20)])
    assert mixed["discordant"] == 1 and mixed["kendall_tau"] == pytest.approx(1 / 3)
    assert order_disagreement([(1, 10)]) == {"pairs": 0, "discordant": 0, "kendall_tau": None}


def test_a_latency_budget_uses_undisturbed_figures_only():
    budget = LatencyBudget(max_ms=15, device=CPU, percentile="p50")
    assert budget.measured(version(1, 0.5, 2.0, {CPU: figures(10, 12)})) == 10
    assert budget.measured(version(1, 0.5, 2.0, {CPU: figures(10, 12, disturbed=True)})) is None
    assert budget.measured(version(1, 0.5, 2.0, {GPU: figures(1, 2)})) is None
    for bad, message in ((dict(max_ms=0), "positive"), (dict(max_ms=float("inf")), "positive"),
                         (dict(max_ms=5, percentile="p99"), "p50 or p90")):
        with pytest.raises(RegistryError, match=message):
            LatencyBudget(device=CPU, **{"percentile": "p90", **bad})
