"""The search's shared start: when trials may share it, and the copy each trial starts from."""

from pathlib import Path

import pytest
import torch

from dynroute.models import NetworkConfig
from dynroute.platform.search.warm_start import prefix_steps, seed_run
from dynroute.platform.train import ray_train
from dynroute.platform.train.checkpoints import STATE_FILE
from dynroute.platform.train.recipe import TrainConfig

BUDGET = frozenset({"train.lambda2", "train.mu"})


@pytest.mark.parametrize(("searched", "stops", "budget_start", "expected"), [
    (BUDGET, (100,), 0.4, 40),
    ({"train.mu"}, (100,), 0.4, 40),
    (BUDGET, (50, 100), 0.4, 40),  # a rung after the shared steps
    (BUDGET, (25, 50, 100), 0.4, 0),  # a rung inside them would compare identical models
    (BUDGET, (40, 100), 0.4, 0),  # ... and so would one at their end
    (BUDGET | {"train.lr"}, (100,), 0.4, 0),  # the learning rate acts from step 1
    ({"model.base_channels"}, (100,), 0.4, 0),  # another network
    (frozenset(), (100,), 0.4, 0),
    (BUDGET, (100,), 0.0, 0),  # the budget acts from the start
    (BUDGET, (100,), 0.999, 99),
    (BUDGET, (100,), 1.0, 0),  # no budget at all: nothing after the prefix
])
def test_prefix_steps(searched, stops, budget_start, expected):
    assert prefix_steps(searched=searched, stops=stops, iterations=100,
                        budget_start=budget_start) == expected


def _prefix_checkpoint(folder: Path, step: int) -> Path:
    checkpoint = folder / f"checkpoint_{step:08d}"
    checkpoint.mkdir(parents=True)
    torch.save({"model": {"w": torch.arange(3.0)}, "optimizer": {"state": {}}, "step": step,
                "mlflow_run_id": "prefix-run", "resumes": [7]}, checkpoint / STATE_FILE)
    return checkpoint


def _check_copy(state: dict, step: int) -> None:
    assert state["step"] == step
    assert state["warm_start"] == {"step": step, "run_id": "prefix-run"}
    assert torch.equal(state["model"]["w"], torch.arange(3.0))
    assert state["mlflow_run_id"] is None, "the trial logs into a run of its own"
    assert "resumes" not in state, "the prefix's history is not the trial's"


def test_seed_run_puts_a_copy_where_training_resumes_from(tmp_path):
    prefix = _prefix_checkpoint(tmp_path / "prefix", 12)
    run_dir = tmp_path / "trials" / "s-t000"
    assert seed_run(str(prefix), str(run_dir))
    _check_copy(ray_train.latest_state(str(run_dir), name=STATE_FILE, in_worker=False), 12)
    assert [p.name for p in run_dir.iterdir()] == ["checkpoint_00000012"], "no temporary left"
    # a trial that trained before keeps its own checkpoint
    torch.save({"step": 30, "model": {}, "optimizer": {}}, run_dir / "x.pt")
    own = run_dir / "checkpoint_00000030"
    own.mkdir()
    (run_dir / "x.pt").rename(own / STATE_FILE)
    assert not seed_run(str(prefix), str(run_dir))
    assert ray_train.latest_state(str(run_dir), name=STATE_FILE, in_worker=False)["step"] == 30


def test_seed_run_into_s3(s3, tmp_path):
    prefix = _prefix_checkpoint(tmp_path / "prefix", 8)
    uri = s3.upload(prefix.parent, "warm", "study/s-prefix")
    run_dir = "s3://warm/study/s-t001"
    assert seed_run(f"{uri}/checkpoint_00000008", run_dir)
    assert s3.keys("warm", "study/s-t001") == [f"study/s-t001/checkpoint_00000008/{STATE_FILE}"]
    _check_copy(ray_train.latest_state(run_dir, name=STATE_FILE, in_worker=False), 8)
    assert not seed_run(f"{uri}/checkpoint_00000008", run_dir)


def test_a_warm_started_trial_ends_bit_for_bit_where_a_cold_one_does(prepared, tmp_path):
    """Before `budget_start` the budget weights change nothing, and drop path draws are seeded
    per worker and step: starting from the shared steps is exact, not an approximation."""
    from dataclasses import replace

    from dynroute.platform.train.spec import TrackingSpec, TrainSpec
    from dynroute.platform.train.training import train

    def spec(name: str, lambda2: float, mu: float) -> TrainSpec:
        return TrainSpec(
            data=str(prepared), model=NetworkConfig(layers=4, base_channels=4, drop_path_prob=0.3),
            train=TrainConfig(iterations=10, batch_size=2, crop=[64, 64], warmup_iterations=2,
                   budget_start=0.4, lambda2=lambda2, mu=mu),
            name=name, storage=str(tmp_path / "runs"), checkpoint_every=5, log_every=5,
            tracking=TrackingSpec(uri=None))

    steps = prefix_steps(searched=BUDGET, stops=(10,), iterations=10, budget_start=0.4)
    prefix = train(replace(spec("prefix", 0.3, 0.2), stop_at=steps))
    assert Path(prefix.checkpoint).name == f"checkpoint_{steps:08d}"
    assert seed_run(prefix.checkpoint, str(tmp_path / "runs" / "warm"))
    warm = train(spec("warm", 0.8, 0.1))
    cold = train(spec("cold", 0.8, 0.1))
    a = torch.load(Path(warm.checkpoint) / STATE_FILE, weights_only=False)
    b = torch.load(Path(cold.checkpoint) / STATE_FILE, weights_only=False)
    assert a["warm_start"]["step"] == steps and b.get("warm_start") is None
    differ = [k for k in b["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
