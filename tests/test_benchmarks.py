"""Benchmarks run in CI at smoke size only: they must run, their figures are read by people."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dynroute.models import NetworkConfig, Route, build_network
from dynroute.models.route_statistics import RouteStatistics
from dynroute.models.summary import summarize
from dynroute.pipelines.prepare import prepare
from dynroute.pipelines.synth import synthesize
from dynroute.platform.config.params import load_params
from dynroute.platform.train.spec import TrainSpec
from dynroute.platform.train.training import train

ROOT = Path(__file__).resolve().parents[1]


def test_dynamic_inference_benchmark_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/dynamic_inference.py", "--smoke"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    for scenario in ("all-open", "no-up-down", "alternate-rows", "random-40"):
        assert scenario in res.stdout
    table = {line.split()[0]: line.split() for line in res.stdout.splitlines()[2:6]}
    assert float(table["all-open"][2]) == 1.0
    assert all(float(row[2]) < 1.0 for name, row in table.items() if name != "all-open")


def _science_check():
    """benchmarks/science_check.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("science_check",
                                                  ROOT / "benchmarks" / "science_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_science_check_runs_at_smoke_size(tmp_path):
    out = tmp_path / "science.json"
    res = subprocess.run([sys.executable, "benchmarks/science_check.py", "--smoke", "--seeds", "0",
                          "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for row in ("dynamic-raw", "dynamic-a", "(b) budget", "(c) dynamic-a by scene kind",
                "(d) dynamic vs static", "mean  dynamic − static over 2 seed(s)"):
        assert row in res.stdout
    assert "data seed 0" in res.stdout and "data seed 1" in res.stdout
    summary = json.loads(out.read_text())
    assert set(summary["seeds"]) == {"0", "1"}
    for networks in summary["seeds"].values():
        assert set(networks) == {"dynamic-raw", "dynamic-a"}
        assert all(n["train_seconds"] > 0 for n in networks.values())
    d = summary["dynamic_vs_static"]
    assert (d["threshold"], d["static"], d["iterations"]) == (0.95, "common-95", 4)
    rows = {(r["seed"], r["network"]): r for r in d["rows"]}
    assert set(rows) == {(s, n) for s in (0, 1) for n in ("dynamic-a", "common-95")}
    for seed in (0, 1):
        dynamic, static = rows[seed, "dynamic-a"], rows[seed, "common-95"]
        assert dynamic["gflops_mean"] == summary["seeds"][str(seed)]["dynamic-a"]["gflops_mean"]
        assert 0 <= static["miou"] <= 1 and static["train_seconds"] > 0
        # A static network costs its route, every image alike; that route is a valid one of the
        # space and its analytic cost, computed here afresh, is the figure in the table.
        route = Route.from_dict({"layers": 4, "paths": static["paths"]})
        network = build_network(NetworkConfig(layers=4, base_channels=4, gate="fixed",
                                              route=route))
        analytic = network.cost_model(64, 128).all_open_real() / 1e9
        assert static["route_gflops"] == pytest.approx(analytic, rel=1e-12)
        assert static["gflops_mean"] == pytest.approx(analytic, rel=1e-9)
        assert f"{len(route.paths)} of " in static["route"]
        # Dynamic-A's whole space with its gates costs more than any static route in it.
        assert static["route_gflops"] < dynamic["route_gflops"]
        assert dynamic["gflops_mean"] <= dynamic["route_gflops"] * (1 + 1e-9)
    for net in ("dynamic-a", "common-95"):
        mean = d["mean"][net]
        assert mean["seeds"] == 2
        assert mean["miou"] == pytest.approx((rows[0, net]["miou"] + rows[1, net]["miou"]) / 2)
    assert d["difference"]["seeds"] == 2
    assert d["difference"]["miou"] == pytest.approx(d["mean"]["dynamic-a"]["miou"]
                                                    - d["mean"]["common-95"]["miou"])
    assert d["difference"]["gflops_mean"] == pytest.approx(
        d["mean"]["dynamic-a"]["gflops_mean"] - d["mean"]["common-95"]["gflops_mean"])


def test_science_check_reports_a_common_x_route_that_does_not_reach_the_decoder(capsys):
    science = _science_check()
    full = Route.full(4)
    stats = RouteStatistics(full)
    shut = {node: torch.zeros(2, len(full.paths_of(node))) for node in full.cells}
    stats.update(shut)
    route, label = science.common_route(stats, 0.95)
    assert route is None
    assert label.startswith("no route above 0.95") and "lower --threshold" in label
    stats.update({node: torch.ones(2, len(full.paths_of(node))) for node in full.cells})
    assert science.common_route(stats, 0.4)[1].endswith("(all: Network-Fix)")  # open 50%

    # In the table: the seed without a route is a row saying so; means and the difference
    # keep to the seed that has one.
    def result(miou, label, route=None):
        figures = {"miou": miou, "chance": 0.05, "gflops": SimpleNamespace(mean=1.0),
                   "train_seconds": 1.0}
        return {"networks": {"dynamic-a": figures | {"all_open_gflops": 2.0}},
                "common": {"name": "common-95", "route": route, "label": label}
                | ({} if route is None else figures | {"miou": miou - 0.1,
                                                        "gflops": SimpleNamespace(mean=0.5),
                                                        "route_gflops": 0.5})}
    args = SimpleNamespace(threshold=0.95, iterations=4)
    compared = science.compare({3: result(0.5, "8 of 29 paths", route=full),
                                4: result(0.6, label)}, args)
    printed = capsys.readouterr().out
    assert f"4     common-95   {label}" in printed
    assert compared["mean"]["common-95"]["seeds"] == 1
    assert compared["mean"]["dynamic-a"]["seeds"] == 2
    assert compared["difference"] == {"seeds": 1, "gflops_mean": 0.5, "gflops_ratio": 2.0,
                                      "miou": pytest.approx(0.1)}
    none = science.compare({4: result(0.6, label)}, args)
    assert none["difference"] is None
    assert "no seed has a common-95 route; lower --threshold" in capsys.readouterr().out


def test_warm_start_benchmark_runs_at_smoke_size():
    res = subprocess.run([sys.executable, "benchmarks/warm_start.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split("  ")[0]: line.split() for line in res.stdout.splitlines()}
    scratch, shared = int(rows["from scratch"][-1]), int(rows["shared start"][-1])
    assert (scratch, shared) == (2 * 5, 2 + 2 * 3), "2 trials of 5 steps sharing ⌊0.4·5⌋ = 2"


def test_latency_noise_benchmark_runs_and_notices_the_hogs():
    res = subprocess.run([sys.executable, "benchmarks/latency_noise.py", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines()
            if line.split() and line.split()[0] in ("quiet", "one-hog", "all-hogs")}
    assert set(rows) == {"quiet", "one-hog", "all-hogs"}
    busy = {name: float(row[5]) for name, row in rows.items()}
    # a spinning process per core takes at least half a core from the timing, and is noticed
    assert busy["all-hogs"] >= 0.5 and rows["all-hogs"][-1] == "DISTURBED"


def _session(tmp_path, *args):
    env = os.environ | {"SMOKE": "1", "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_gpu_session_runs_every_step_and_times_a_baseline_models_folder(tmp_path):
    baseline = tmp_path / "base" / "models"
    shutil.copytree(ROOT / "models", baseline)  # stands for an older version of models/
    res = _session(tmp_path, str(baseline))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {
        "gpu_bench.log", "gpu_bench.json", "graph_step_check.log", "gpu_bench-baseline.log",
        "gpu_bench-baseline.json"}
    assert "0 step(s) failed" in res.stdout
    assert f"models loaded from {baseline}" in (out / "gpu_bench-baseline.log").read_text()
    assert "OK: worst" in (out / "graph_step_check.log").read_text()


def test_gpu_session_refuses_a_baseline_that_is_not_a_models_folder(tmp_path):
    res = _session(tmp_path, str(tmp_path))
    assert res.returncode == 2
    assert "has no network.py" in res.stderr and str(tmp_path) in res.stderr
    assert not (tmp_path / "out").exists(), "nothing run, nothing written"


def _table1_summary(route_dict):
    """Params and GFLOPs of a printed route, from the built static network (L=16, 1024×2048)."""
    route = Route.from_dict(route_dict)
    network = build_network(NetworkConfig(layers=16, gate="fixed", route=route))
    report = summarize(network, 1024, 2048)
    return route, report["params"], report["gflops"]


def test_table1_routes_smoke_claims_hold_when_recomputed(tmp_path):
    out = tmp_path / "table1.json"
    res = subprocess.run([sys.executable, "benchmarks/table1_routes.py", "--smoke", "--json",
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    networks = {n["network"]: n for n in json.loads(out.read_text())["networks"]}
    assert set(networks) == {"FCN-32s", "DeepLabV3", "U-Net", "HRNetV2", "Auto-DeepLab"}
    for name, n in networks.items():
        assert name in res.stdout
        paper = n["paper"]
        for claim in [n["best"], n.get("outside_pattern")]:
            if claim is None:
                continue
            _, params, gflops = _table1_summary(claim["route"])
            assert (params, gflops) == (claim["params"], pytest.approx(claim["gflops"]))
            errors = (params / (paper["params_m"] * 1e6) - 1, gflops / paper["gflops"] - 1)
            assert claim["within"] == (max(abs(e) for e in errors) <= 0.05), (name, errors)
        # A network is either matched or comes with the reasons why it cannot be.
        assert n["best"]["within"] == (not n["reasons"]) == (n["within_count"] > 0)
    assert networks["HRNetV2"]["best"]["within"]
    # The single-path bound is a single path of the space and falls short of each paper figure.
    bound = networks["FCN-32s"]["single_path_bound"]
    route, _, gflops = _table1_summary(bound["route"])
    assert all(len({k for r, k in route.cells if r == row}) == 1 for row in range(16))
    assert gflops == pytest.approx(bound["gflops"])
    for name in ("FCN-32s", "DeepLabV3", "Auto-DeepLab"):
        assert networks[name]["single_path_bound"]["route"] == bound["route"]
        assert gflops < 0.95 * networks[name]["paper"]["gflops"]
        assert any("no single path" in r for r in networks[name]["reasons"])


def _budget_convergence():
    """benchmarks/budget_convergence.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "budget_convergence", ROOT / "benchmarks" / "budget_convergence.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def test_budget_convergence_smoke_logs_each_step_and_trains_what_dynroute_train_trains(tmp_path):
    bench = _budget_convergence()
    params = bench.smoke_params(load_params(ROOT / "params.yaml"))
    synth, data, out = params.synth, tmp_path / "prepared", tmp_path / "out"
    synthesize(synth.dataset, tmp_path / "raw", train=synth.train, val=synth.val,
               height=synth.height, width=synth.width, seed=synth.seed)
    prepare(synth.dataset, tmp_path / "raw", data, workers=1)
    res = subprocess.run([sys.executable, "benchmarks/budget_convergence.py", "--smoke", "--data",
                          str(data), "--variant", "base:train.lambda2_scale=1", "--variant",
                          "scale20:train.lambda2_scale=20", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in ("base", "scale20")}
    assert all([r["step"] for r in records] == list(range(8)) for records in logs.values())
    base, scaled = logs["base"], logs["scale20"]
    start = 4  # 8 steps, the budget from 40%: w(3/8) = 0, w(4/8) > 0
    budget_keys = {"w", "lambda2", "mu", "budget", "penalty", "gnorm_gate_budget_w1",
                   "gnorm_gatebias_budget_w1", "elapsed_s"}
    for b, s in zip(base[:start], scaled[:start], strict=True):  # trained once, shared
        assert b["w"] == s["w"] == 0 and b["budget"] == s["budget"] == 0
        assert {k: v for k, v in b.items() if k not in budget_keys} == {
            k: v for k, v in s.items() if k not in budget_keys}
        assert s["gnorm_gatebias_budget_w1"] == pytest.approx(20 * b["gnorm_gatebias_budget_w1"],
                                                              rel=1e-5)
    # The budget's first step: the gates are still the same in both, its loss 20 times the base's.
    b, s = base[start], scaled[start]
    assert b["w"] == s["w"] > 0
    for key in ("seg", "E_over_Call", "alpha_mean", "alpha_open_frac", "bias_mean"):
        assert b[key] == s[key], key
    assert b["budget"] == pytest.approx(0.8 * b["w"] * (b["E_over_Call"] - 0.1) ** 2, rel=1e-5)
    assert s["budget"] == pytest.approx(20 * b["budget"], rel=1e-6)
    assert scaled[-1]["seg"] != base[-1]["seg"], "the budget acted differently after its start"

    summary = json.loads((out / "summary.json").read_text())
    assert [(p["variants"], p["steps"]) for p in summary["shared"]] == [(["base", "scale20"], 4)]
    rows = {r["variant"]: r for r in summary["variants"]}
    table = {line.split()[0]: line.split() for line in res.stdout.splitlines()
             if line.split() and line.split()[0] in rows}
    for name, row in rows.items():
        last = logs[name][-1]
        assert row["E_over_Call_last"] == last["E_over_Call"]
        assert row["gnorm_gatebias_budget_w1_at_start"] == logs[name][start][
            "gnorm_gatebias_budget_w1"]
        assert row["status"] == ("reached" if abs(last["E_over_Call"] - 0.1) <= 0.05 else
                                 "above" if last["E_over_Call"] > 0.1 else "below")
        assert row["gflops_min"] <= row["gflops_mean"] <= row["gflops_max"]
        assert row["gflops_max"] <= row["gflops_all_open"] * (1 + 1e-9)
        assert row["gflops_ratio"] == pytest.approx(row["gflops_mean"] / row["gflops_all_open"])
        assert 0 <= row["miou"] <= 1 and 0 <= row["paths_open"] <= 1
        printed = table[name]
        assert float(printed[1]) == pytest.approx(row["lambda2"], rel=1e-2)
        assert printed[3:5] == [f"{last['E_over_Call']:.3f}", row["status"]]
        assert float(printed[5]) == pytest.approx(row["gnorm_gatebias_budget_w1_at_start"],
                                                  rel=1e-2)
        assert printed[-1] == f"{row['miou']:.4f}"
    assert rows["scale20"]["lambda2"] == pytest.approx(20 * rows["base"]["lambda2"])

    # `dynroute train`'s own function, from scratch, ends the scaled variant where the
    # benchmark's copy of the shared steps did.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the benchmark's
    try:
        run = replace(params.run, name="scale20", storage=str(tmp_path / "runs"), workers=0,
                      log_every=1, checkpoint_every=8)
        result = train(TrainSpec.for_run(run, data=str(data), model=params.model,
                                         train=replace(params.train, budget="dynamic-a",
                                                       lambda2_scale=20.0)))
    finally:
        torch.set_num_threads(threads)
    figures = torch.load(Path(result.checkpoint) / "state.pt", weights_only=False)["figures"]
    assert figures["step"] == 8
    last = scaled[-1]
    assert figures["loss_seg"] == pytest.approx(last["seg"], rel=1e-6)
    assert figures["loss_budget"] == pytest.approx(last["budget"], rel=1e-6)
    assert figures["expected_cost_ratio"] == pytest.approx(last["E_over_Call"], rel=1e-6)
