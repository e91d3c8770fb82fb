"""Where a search's rung evaluates: a GPU run on several Ray Train workers takes a GPU of its own
for the evaluation, outside the trial's placement group, whose CPUs may be all a node has.

The Ray cluster declares two GPUs that torch cannot see: Ray schedules them like real ones
(`CUDA_VISIBLE_DEVICES`, `ray.get_gpu_ids()`), and the evaluation itself falls back to the CPU.
"""

from dataclasses import replace

import pytest

from dynroute.models import NetworkConfig
from dynroute.platform import metrics as M
from dynroute.platform.evaluate.latency import LatencySettings
from dynroute.platform.search import trial as TR
from dynroute.platform.search.latency_cost import LATENCY_DEVICE
from dynroute.platform.search.study import REPORT_KEYS
from dynroute.platform.train.recipe import TrainConfig
from dynroute.platform.train.spec import TrainSpec

TINY_MODEL = NetworkConfig(layers=4, base_channels=4, num_classes=19)
TINY_TRAIN = TrainConfig(iterations=2, batch_size=2, crop=(64, 64), warmup_iterations=1)


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    import ray

    from dynroute.platform.train.ray_train import init_ray

    init_ray(num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()


@pytest.fixture
def trial_group(ray_with_a_gpu):
    """A placement group holding every CPU of the cluster, capturing its tasks' children, as a
    trial's group captures the rung task and what the rung task starts."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"CPU": 2}])
    ray.get(group.ready(), timeout=120)
    yield group, PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    remove_placement_group(group)


def _where() -> tuple[list, str | None]:
    import ray

    context = ray.get_runtime_context()
    return [int(i) for i in ray.get_gpu_ids()], context.get_placement_group_id()


def _submit_from_inside(options: dict | None) -> tuple[list, str | None]:
    """From a task of the trial's group: where a child task started with `options` runs."""
    import ray

    child = ray.remote(_where)
    if options is not None:
        child = child.options(**options)
    return ray.get(child.remote(), timeout=60)


def test_only_a_multi_worker_gpu_run_evaluates_in_a_task_of_its_own():
    spec = TrainSpec(data="data", model=TINY_MODEL, train=TINY_TRAIN)
    assert TR.rung_evaluation_options(spec) is None
    assert TR.rung_evaluation_options(replace(spec, workers=2)) is None, "CPUs: the rung's own"
    assert TR.rung_evaluation_options(replace(spec, use_gpu=True)) is None, "trained in the task"
    options = TR.rung_evaluation_options(replace(spec, use_gpu=True, workers=2))
    assert (options["num_gpus"], options["num_cpus"]) == (1, 0)


@pytest.mark.slow
def test_the_evaluation_task_takes_a_gpu_outside_the_trial_group(trial_group):
    import ray

    group, strategy = trial_group
    inside = ray.remote(_submit_from_inside).options(num_cpus=2, scheduling_strategy=strategy)
    gpus, where = ray.get(inside.remote(None), timeout=120)
    assert (gpus, where) == ([], group.id.hex()), "a plain child task stays in the trial's group"
    options = TR.rung_evaluation_options(
        TrainSpec(data="data", model=TINY_MODEL, train=TINY_TRAIN, use_gpu=True, workers=1))
    gpus, where = ray.get(inside.remote(options), timeout=120)
    assert len(gpus) == 1, "the evaluation holds one GPU"
    assert where is None, "outside the trial's group, whose CPUs are all taken"


@pytest.mark.slow
def test_a_multi_worker_gpu_rung_reports_what_the_in_task_evaluation_reports(trial_group,
                                                                             prepared, tmp_path):
    """A run trained to its end (so the rung does not train again: no CUDA needed), its final
    rung evaluated by the rung task itself (CPU run) and by a task of its own (GPU run)."""
    import ray

    from dynroute.platform.train.training import train

    spec = TrainSpec(data=str(prepared), model=TINY_MODEL, train=TINY_TRAIN, name="rung",
                     storage=str(tmp_path / "runs"), checkpoint_every=2, log_every=2)
    train(spec)
    _, strategy = trial_group
    rung = ray.remote(TR.train_and_evaluate).options(num_cpus=2, scheduling_strategy=strategy,
                                                     max_retries=0)
    kwargs = {"stop": None, "split": "val", "cost_resolution": (64, 128)}
    in_task = ray.get(rung.remote(spec.to_dict(), **kwargs), timeout=300)
    own_task = ray.get(rung.remote(replace(spec, use_gpu=True, workers=1).to_dict(), **kwargs),
                       timeout=300)
    assert in_task["step"] == own_task["step"] == 2
    assert in_task["checkpoint"] == own_task["checkpoint"]
    for name in REPORT_KEYS:
        assert own_task[name] == pytest.approx(in_task[name], rel=1e-6), name
    assert 0.0 <= in_task[M.MIOU] <= 1.0 and in_task[M.GFLOPS_MEAN] > 0
    assert M.LATENCY_P90_MS not in in_task, "cost: gflops times nothing"
    # tune.cost: latency: the task of its own times the network too (here on the CPU: torch
    # sees no GPU); the machine may be busy, so the timing is not judged
    timing = LatencySettings(images=1, warmup=0, repeats=3, attempts=1, accept_disturbed=True)
    timed = ray.get(rung.remote(replace(spec, use_gpu=True, workers=1).to_dict(), **kwargs,
                                latency=timing), timeout=300)
    assert timed[M.LATENCY_P90_MS] > 0 and timed[LATENCY_DEVICE].startswith("cpu-")
    assert timed[M.GFLOPS_MEAN] == pytest.approx(in_task[M.GFLOPS_MEAN], rel=1e-6)


def _loader_sizing() -> tuple[list, int, int]:
    import ray
    import torch

    from dynroute.platform.device import fast_path

    return (ray.get_gpu_ids(), fast_path.machine_gpus(),
            fast_path.loader_workers(torch.device("cuda"), cores=16))


@pytest.mark.slow
def test_a_task_with_one_gpu_sizes_its_loader_by_its_nodes_gpus(ray_with_a_gpu):
    """torch in a one-GPU task would count one GPU; the node's 16 cores feed both."""
    import ray

    task = ray.remote(_loader_sizing).options(num_cpus=0, num_gpus=1)
    gpus, machine, workers = ray.get(task.remote(), timeout=120)
    assert len(gpus) == 1
    assert machine == 2
    assert workers == 16 // 2 - 1



def test_a_one_cpu_task_runs_torch_on_one_thread():
    """Trials of a search run side by side, one CPU each: torch in a trial must keep to it.
    Ray sets OMP_NUM_THREADS for a task; torch loaded in a worker before that would take every
    core, and two trials on two cores ran ~5x slower. A fresh local cluster, as `dynroute tune`
    starts one (this module's cluster has reused workers for tasks of other sizes)."""
    import subprocess
    import sys

    code = (
        "import ray\n"
        "from dynroute.platform.train.ray_train import init_ray\n"
        "init_ray(num_cpus=2)\n"
        "@ray.remote(num_cpus=1)\n"
        "def threads():\n"
        "    import torch\n"
        "    return torch.get_num_threads()\n"
        "print('threads', *ray.get([threads.remote() for _ in range(2)]))\n"
        "ray.shutdown()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "threads 1 1" in res.stdout, res.stdout[-2000:]
