"""Training end to end on tiny synthetic data: in-process, on Ray workers, after a worker dies,
as a Ray job, and tracked in a real MLflow server."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from dynroute.models import NetworkConfig
from dynroute.platform.train.recipe import TrainConfig

BIN = Path(sys.executable).parent
DYNROUTE = str(BIN / "dynroute")
STEP = re.compile(r"train: step (\d+)/(\d+)")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")


def write_params(path: Path, **sections) -> Path:
    base = {
        "model": {"layers": 4, "base_channels": 8},
        "train": {"iterations": 30, "batch_size": 4, "crop": [64, 64], "warmup_iterations": 5},
        "run": {"checkpoint_every": 10, "log_every": 5, "storage": str(path.parent / "runs"),
                "name": "t"},
        "evaluate": {"cost_resolution": [64, 128]},
        "tracking": {"uri": "none"},
    }
    for key, values in sections.items():
        base[key] = base.get(key, {}) | values
    path.write_text(yaml.safe_dump(base))
    return path


def env() -> dict:
    return os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(*args, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DYNROUTE, *map(str, args)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def steps(output: str) -> list[int]:
    return [int(m.group(1)) for m in STEP.finditer(output)]


def test_in_process_training_learns_checkpoints_and_resumes(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml")
    first = run("train", "--data", prepared, "--params", params, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss_seg ([\d.]+)", first.stdout)]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    run_dir = tmp_path / "runs" / "t"
    assert sorted(p.name for p in run_dir.glob("checkpoint_*")) == [
        "checkpoint_00000020", "checkpoint_00000030"], "keeps the last two"
    state = torch.load(run_dir / "checkpoint_00000030" / "state.pt", weights_only=False)
    assert state["step"] == 30

    more = run("train", "--data", prepared, "--params", params, "--iterations", "40",
               cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from checkpoint at step 30" in more.stdout
    assert steps(more.stdout) == [35, 40], "continues, does not start over"


def test_bf16_and_channels_last_train(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", train={"iterations": 5},
                          run={"bf16": True, "channels_last": True, "log_every": 5})
    res = run("train", "--data", prepared, "--params", params, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    loss = float(re.search(r"loss_seg ([\d.]+)", res.stdout).group(1))
    assert 0 < loss < 10


def test_bad_settings_fail_before_training(prepared, tmp_path):
    params = write_params(tmp_path / "params.yaml", train={"budget": "dynamic-q"})
    res = run("train", "--data", prepared, "--params", params, cwd=tmp_path)
    assert res.returncode == 1 and "dynamic-q" in res.stderr
    params = write_params(tmp_path / "params.yaml")
    res = run("train", "--data", tmp_path / "nowhere", "--params", params, cwd=tmp_path)
    assert res.returncode == 1 and "dynroute data prepare" in res.stderr


def test_lambda2_scale_multiplies_the_budget_loss_and_nothing_else(prepared, tmp_path):
    """Step 1 trains without the budget (its weight ramps up from 0), so both runs reach step 2
    with the same gates: there the budget loss is λ2 · lambda2_scale · (E/C_all − μ)²."""
    logged = {}
    for scale in (1.0, 10.0):
        folder = tmp_path / f"scale-{scale}"
        folder.mkdir()
        params = write_params(folder / "params.yaml", train={
            "iterations": 2, "budget": "dynamic-a", "budget_start": 0.0, "budget_ramp": 0.01,
            "lambda2_scale": scale}, run={"log_every": 1, "checkpoint_every": 2})
        res = run("train", "--data", prepared, "--params", params, cwd=folder)
        assert res.returncode == 0, res.stderr[-3000:]
        logged[scale] = [(float(b), float(r)) for b, r in re.findall(
            r"loss_budget ([\d.]+) expected_gflops [\d.]+ \(E/C_all ([\d.]+)\)", res.stdout)]
    _, (budget_1, ratio_2) = logged[1.0]
    assert budget_1 == pytest.approx(0.8 * (ratio_2 - 0.1) ** 2, rel=1e-2), "Dynamic-A's λ2, μ"
    assert logged[10.0][1][1] == ratio_2, "the same gates at step 2"
    assert logged[10.0][1][0] == pytest.approx(10 * budget_1, rel=1e-3)
    params = write_params(tmp_path / "params.yaml", train={"lambda2_scale": 0})
    res = run("train", "--data", prepared, "--params", params, cwd=tmp_path)
    assert res.returncode == 1 and "train.lambda2_scale" in res.stderr, res.stderr


def _ray_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "ray::RayTrainWorker" in line]


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(prepared, tmp_path):
    every = 10
    params = write_params(tmp_path / "params.yaml",
                          train={"iterations": 80, "batch_size": 2},
                          run={"workers": 2, "checkpoint_every": every, "log_every": 1,
                               "max_failures": 2, "name": "kill"})
    proc = subprocess.Popen([DYNROUTE, "train", "--data", str(prepared), "--params",
                             str(params)], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        target = tmp_path / "runs" / "kill" / "checkpoint_00000020"
        deadline = time.monotonic() + 240
        while not target.exists():
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        killed_at = len(lines)
        victims = _ray_worker_pids()
        assert len(victims) == 2, victims
        os.kill(victims[-1], signal.SIGKILL)
        lines.append(f"#### killed {victims[-1]} of {victims}\n")
        proc.wait(timeout=400)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines)
    assert proc.returncode == 0, output[-4000:]
    resumed = [int(v) for v in RESUMED.findall(output)]
    assert resumed, "the run must restart from a checkpoint, not from zero\n" + output[-6000:]
    before = steps("".join(lines[:killed_at])) or [0]
    assert resumed[0] % every == 0 and resumed[0] >= 20
    assert max(before) - resumed[0] <= every, (max(before), resumed)
    after = steps("".join(lines[killed_at:]))
    assert after and after[-1] == 80, "every iteration is completed"
    assert min(s for s in after if s > resumed[0]) == resumed[0] + 1


@pytest.mark.slow
def test_training_is_tracked_in_mlflow(prepared, tmp_path):
    from mlflow.tracking import MlflowClient

    from dynroute.platform.tracking.server import MlflowServer

    with MlflowServer(root=tmp_path / "mlruns") as server:
        params = write_params(tmp_path / "params.yaml", tracking={"uri": server.uri},
                              train={"iterations": 20})
        res = run("train", "--data", prepared, "--params", params, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        res = run("evaluate", "--checkpoint", tmp_path / "runs" / "t", "--data", prepared,
                  "--params", params, "--out", tmp_path / "eval", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("dynroute")
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        train = runs["t"]
        assert train.info.status == "FINISHED"
        assert train.data.params["train.iterations"] == "20"
        assert train.data.params["model.layers"] == "4"
        for tag in ("git_commit", "data_hash", "params_hash"):
            assert train.data.tags[tag]
        history = client.get_metric_history(train.info.run_id, "loss_seg")
        assert [m.step for m in history] == [5, 10, 15, 20]
        evaluation = runs["evaluate-t"]
        assert 0.0 <= evaluation.data.metrics["miou"] <= 1.0
        assert evaluation.data.metrics["gflops_mean"] > 0
        artifacts = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
        assert {"gate_probability.png", "route.png", "per_image.parquet"} <= artifacts
        assert evaluation.data.tags["training_run_id"] == train.info.run_id
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert [m.source_run_id for m in models] == [train.info.run_id]
        # the logged model evaluates like its checkpoint
        res = run("evaluate", "--checkpoint", f"models:/{models[0].model_id}", "--data",
                  prepared, "--params", params, "--out", tmp_path / "eval-model", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        by_checkpoint = (tmp_path / "eval" / "metrics.json").read_text()
        by_model = (tmp_path / "eval-model" / "metrics.json").read_text()
        assert json.loads(by_model)["miou"] == json.loads(by_checkpoint)["miou"]


@pytest.mark.slow
def test_stop_at_pauses_and_a_second_call_resumes_to_the_end(prepared, tmp_path, capfd):
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from dynroute.platform.tracking.server import MlflowServer
    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    with MlflowServer(root=tmp_path / "mlruns") as server:
        spec = TrainSpec(data=str(prepared), model=NetworkConfig(layers=4, base_channels=4),
                         train=TrainConfig(iterations=20, batch_size=2, crop=[64, 64],
                                warmup_iterations=2),
                         name="pause", storage=str(tmp_path / "runs"), checkpoint_every=100,
                         log_every=5, tracking=TrackingSpec(uri=server.uri, run_name="pause"))
        client = MlflowClient(server.uri)
        paused = train(replace(spec, stop_at=10))
        assert paused.metrics["step"] == 10
        assert Path(paused.checkpoint).name == "checkpoint_00000010"
        experiment = client.get_experiment_by_name("dynroute")
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "RUNNING", "a paused run is not finished"
        assert not client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert steps(capfd.readouterr().out) == [5, 10]

        done = train(spec)
        out = capfd.readouterr().out
        assert "resumed from checkpoint at step 10" in out
        assert steps(out) == [15, 20], "the step counter continues"
        assert done.metrics["step"] == 20
        [run] = client.search_runs([experiment.experiment_id])  # the same run, continued
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss_seg")
        assert [m.step for m in history] == [5, 10, 15, 20]
        models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        assert [m.source_run_id for m in models] == [run.info.run_id], "logged once, at the end"



@pytest.mark.slow
def test_a_failed_training_ends_its_run_failed_and_resuming_continues_it(prepared, tmp_path):
    """The driver owns the MLflow run: a training whose data breaks ends FAILED (never stays
    RUNNING); run again after the fix, it resumes from its checkpoint in the same run."""
    import shutil
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from dynroute.platform.tracking.server import MlflowServer
    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shards = sorted((data / "shards").glob("train-*.parquet"))
    assert shards, "the prepared data has train shards"
    manifest = data / "manifest.json"
    originals = {p: p.read_bytes() for p in [*shards, manifest]}

    def break_shards() -> None:
        """The failure must come from the workers: the manifest is rewritten to vouch for the
        broken shards (their checksums), so the driver's check of the shards passes."""
        document = json.loads(manifest.read_text())
        for path in shards:
            path.write_bytes(b"not parquet")
        for shard in document["splits"]["train"]["shards"]:
            shard["sha256"] = hashlib.sha256(b"not parquet").hexdigest()
        manifest.write_text(json.dumps(document))

    with MlflowServer(root=tmp_path / "mlruns") as server:
        client = MlflowClient(server.uri)
        spec = TrainSpec(data=str(data), model=NetworkConfig(layers=4, base_channels=4),
                         train=TrainConfig(iterations=10, batch_size=2, crop=[64, 64],
                                warmup_iterations=2),
                         name="fragile", storage=str(tmp_path / "runs"), checkpoint_every=5,
                         log_every=5, tracking=TrackingSpec(uri=server.uri, run_name="fragile"))
        train(replace(spec, stop_at=5))
        experiment = client.get_experiment_by_name("dynroute")
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "RUNNING"

        break_shards()
        with pytest.raises(Exception):  # noqa: B017 (Ray wraps the worker's error)
            train(spec)
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FAILED", "a failed training does not stay RUNNING"

        for path, content in originals.items():
            path.write_bytes(content)
        assert train(spec).metrics["step"] == 10
        [run] = client.search_runs([experiment.experiment_id])  # the same run, continued
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "loss_seg")
        assert [m.step for m in history] == [5, 10]

        break_shards()  # a new training that fails before its first checkpoint
        with pytest.raises(Exception):  # noqa: B017
            train(replace(spec, name="fresh", tracking=replace(spec.tracking, run_name="fresh")))
        fresh = client.search_runs([experiment.experiment_id],
                                   filter_string="tags.`mlflow.runName` = 'fresh'")
        assert [r.info.status for r in fresh] == ["FAILED"]
        assert fresh[0].data.params["train.iterations"] == "10", "params logged by the driver"


def test_a_resumed_training_ends_bit_for_bit_where_an_uninterrupted_one_does(prepared, tmp_path):
    """Drop path draws are seeded per worker and step, so a pause (or a failure) changes
    nothing in the result."""
    from dataclasses import replace

    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    spec = TrainSpec(data=str(prepared),
                     model=NetworkConfig(layers=4, base_channels=4, drop_path_prob=0.3),
                     train=TrainConfig(iterations=8, batch_size=2, crop=[64, 64],
                            warmup_iterations=2),
                     name="whole", storage=str(tmp_path / "runs"), checkpoint_every=2,
                     log_every=2, tracking=TrackingSpec(uri=None))
    whole = train(spec)
    paused = replace(spec, name="paused")
    train(replace(paused, stop_at=3))  # a pause checkpoints step 3, between the regular ones
    resumed = train(paused)
    a = torch.load(Path(whole.checkpoint) / "state.pt", weights_only=False)["model"]
    b = torch.load(Path(resumed.checkpoint) / "state.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_each_worker_and_step_draws_from_a_seed_of_its_own():
    from dynroute.platform.train.training import step_seed

    seeds = {step_seed(0, rank, step) for rank in range(4) for step in range(100)}
    assert len(seeds) == 400, "workers do not drop the same samples' branches"
    assert step_seed(0, 1, 7) == step_seed(0, 1, 7) != step_seed(1, 1, 7)


def test_a_diverging_training_stops_with_a_clear_error_before_any_bad_checkpoint(prepared,
                                                                                 tmp_path):
    """Steps do not wait for the device, so divergence is caught where figures are read back:
    at the next log or checkpoint step, before that checkpoint is written."""
    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    spec = TrainSpec(data=str(prepared), model=NetworkConfig(layers=4, base_channels=4),
                     train=TrainConfig(iterations=12, batch_size=2, crop=[64, 64],
                            warmup_iterations=0, lr=1e12),
                     name="diverge", storage=str(tmp_path / "runs"), checkpoint_every=3,
                     log_every=6, tracking=TrackingSpec(uri=None))
    with pytest.raises(Exception) as caught:
        train(spec)
    chain, err = [], caught.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__ or err.__context__
    found = [m for text in chain for m in [re.search(r"not finite in steps (\d+)-(\d+)", text)]
             if m and "diverged" in text]
    assert found, chain
    last = int(found[0].group(2))
    for checkpoint in (tmp_path / "runs" / "diverge").glob("checkpoint_*"):
        assert int(checkpoint.name.split("_")[1]) < last, f"{checkpoint.name} is past the failure"
        state = torch.load(checkpoint / "state.pt", weights_only=False)
        assert all(torch.isfinite(v).all() for v in state["model"].values()
                   if v.is_floating_point()), f"{checkpoint.name} holds a diverged model"


def test_a_resume_keeps_the_loader_processes_its_batch_order_came_from(prepared, tmp_path):
    """Batches come round-robin from the loader processes, so their number decides the order;
    a resume with the count unset (auto: none on a CPU) keeps the checkpoint's."""
    from dataclasses import replace

    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    spec = TrainSpec(data=str(prepared), model=NetworkConfig(layers=4, base_channels=4),
                     train=TrainConfig(iterations=8, batch_size=2, crop=[64, 64],
                            warmup_iterations=2),
                     name="two", storage=str(tmp_path / "runs"), checkpoint_every=4,
                     log_every=4, loader_workers=2, tracking=TrackingSpec(uri=None))
    whole = train(spec)
    paused = replace(spec, name="paused")
    train(replace(paused, stop_at=3))
    resumed = train(replace(paused, loader_workers=None))
    a = torch.load(Path(whole.checkpoint) / "state.pt", weights_only=False)
    b = torch.load(Path(resumed.checkpoint) / "state.pt", weights_only=False)
    assert a["loader_workers"] == b["loader_workers"] == 2
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
