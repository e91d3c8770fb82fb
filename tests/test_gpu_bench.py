"""benchmarks/gpu_bench.py runs where only PyTorch is installed, and its numerics checks compare."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dynroute.models import NetworkConfig, build_network
from dynroute.models.gate import pin_gate

ROOT = Path(__file__).resolve().parents[1]
# What the script reads from the repository: the model package, its own parts and the two scripts
# it reuses.
PARTS = tuple(f"benchmarks/speed/{p.name}" for p in (ROOT / "benchmarks" / "speed").glob("*.py"))
NEEDED = ("benchmarks/gpu_bench.py", *PARTS, "benchmarks/dynamic_inference.py",
          "platform/train/recipe.py", "platform/device/cuda_graph.py")
# And what the profile and the graph-step check read besides.
NEEDED_BESIDE = ("benchmarks/gpu_profile.py", "benchmarks/graph_step_check.py",
                 "platform/train/train_step.py", "platform/device/fast_path.py")


@pytest.fixture
def speed(monkeypatch) -> SimpleNamespace:
    """The benchmark's parts (benchmarks/speed), imported as the scripts beside them do."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return SimpleNamespace(**{part: importlib.import_module(f"speed.{part}")
                              for part in ("common", "training", "inference", "dynamic")})


def _torch_only_site(dest: Path) -> Path:
    """A folder with links to torch, numpy and their dependencies only (no dynroute, no PyYAML).

    Put on PYTHONPATH under `python -S`, it is an ordinary path entry: no .pth file runs, so the
    editable install of dynroute is not importable either.
    """
    dest.mkdir()
    seen: set[str] = set()
    todo = ["torch", "numpy"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency that is not installed
        for top in {f.parts[0] for f in dist.files or []}:
            if top in ("..", "__pycache__") or top.endswith(".pth") or (dest / top).exists():
                continue
            (dest / top).symlink_to(Path(dist.locate_file(top)).resolve())
        todo += [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in dist.requires or []
                 if "extra ==" not in r]
    return dest


def _checkout_copy(dest: Path, needed: tuple[str, ...] = NEEDED) -> Path:
    shutil.copytree(ROOT / "models", dest / "models",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel in needed:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


@pytest.mark.slow
def test_smoke_run_needs_only_torch_and_uses_the_models_folder_next_to_it(tmp_path, speed):
    work = _checkout_copy(tmp_path / "checkout")
    site = _torch_only_site(tmp_path / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    python = [sys.executable, "-S"]  # no site-packages, no .pth: only what PYTHONPATH holds

    probe = subprocess.run(
        [*python, "-c", "import importlib.util as u, torch, numpy; "
                        "print(u.find_spec('dynroute'), u.find_spec('yaml'))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["None", "None"], "dynroute or PyYAML leaked into the env"

    out = tmp_path / "bench.json"
    res = subprocess.run(
        [*python, "benchmarks/gpu_bench.py", "--smoke", "--device", "cpu", "--json", str(out),
         "--time-budget", "100000"],  # never skip a case for time in CI
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"models loaded from {work / 'models'} (as dynroute.models)" in res.stdout
    assert "PyYAML absent" in res.stdout

    results = json.loads(out.read_text())["results"]
    assert results["train"][0]["case"] == "eager fp32 (baseline)"
    expected = {"train": [c.name for c in speed.training.TRAIN_CASES if not c.cuda_only],
                "infer": [c.name for c in speed.inference.INFER_CASES if not c.cuda_only]}
    for section, names in expected.items():
        assert [r["case"] for r in results[section]] == names
        for row in results[section]:
            assert row["status"] == "ok", (row["case"], row["status"])
            assert row["check"]["ok"], (row["case"], row["check"])
            if section == "train":
                assert row["grad_check"]["ok"], (row["case"], row["grad_check"])
            assert row["case"] in res.stdout
    # Deterministic figures a CPU measures for GPU work: operators and kept activations.
    infer = {r["case"]: r["extra"] for r in results["infer"]}
    base = infer["eager fp32 (baseline)"]["ops"]
    assert infer["folded BN + CL (default)"]["ops"] < base, "folding removes the BN operators"
    assert base <= infer["static soft forward fp32"]["ops"], \
        "routing bookkeeping adds no tensor operators to an all-open forward"
    train = {r["case"]: r["extra"] for r in results["train"]}
    assert train["eager fp32 (baseline)"]["ops"] > base
    assert 0 < train["bf16 autocast"]["saved_mib"] < train["eager fp32 (baseline)"]["saved_mib"]
    mixed = [r for r in results["dynamic"] if r["case"] == speed.dynamic.MIXED_CASE]
    assert len(mixed) == 1 and mixed[0]["check"]["ok"], mixed
    timed = [r for r in results["dynamic"] if r["case"] != speed.dynamic.MIXED_CASE]
    scenarios = {r["extra"]["scenario"] for r in timed}
    assert scenarios == {"all-open", "no-up-down", "alternate-rows", "random-40"}
    assert all(r["status"] == "ok" for r in timed)
    assert {r["extra"]["path"] for r in timed} >= {"eager fp32 (baseline)"}
    assert all(r["extra"]["host_waits"] is None for r in timed), "counted on CUDA only"
    for scenario in scenarios:
        assert f"/ {scenario}" in res.stdout


@pytest.mark.slow
def test_profile_and_graph_step_check_need_only_torch(tmp_path):
    """The two other GPU scripts run from a checkout where only PyTorch is installed: the
    profile attributes time to operators and convolution kinds, and the check compares the
    training loop's graphed step (its body, on a CPU) with the eager one."""
    work = _checkout_copy(tmp_path / "checkout", NEEDED + NEEDED_BESIDE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env |= {"PYTHONPATH": str(_torch_only_site(tmp_path / "site")), "PYTHONNOUSERSITE": "1"}
    python = [sys.executable, "-S"]
    out = tmp_path / "profile.json"
    res = subprocess.run([*python, "benchmarks/gpu_profile.py", "--smoke", "--device", "cpu",
                          "--json", str(out)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"infer", "graph", "train"}
    base = results["infer"]["eager fp32 (baseline)"]
    assert base["wall_ms"] > 0 and base["device_ms_per_call"] > 0
    assert {row[0] for row in base["convs"]} == {"depthwise 3x3 fwd", "1x1 fwd", "dense 3x3 fwd"}
    assert any(name == "aten::native_batch_norm" for name, *_ in base["ops"])
    folded = results["infer"]["folded BN + CL (default)"]
    assert not any("batch_norm" in name for name, *_ in folded["ops"]), "folding removes BN"
    train = results["train"]["channels-last"]
    assert {"depthwise 3x3 bwd", "1x1 bwd"} <= {row[0] for row in train["convs"]}

    res = subprocess.run([*python, "benchmarks/graph_step_check.py", "--device", "cpu",
                          "--steps", "4", "--size", "64"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "OK: worst" in res.stdout and "budget term on in some steps: True" in res.stdout


def test_saved_activation_count_frees_what_it_measured(speed):
    """Counting the kept activations must not keep them: it once held every case's
    activations through a reference cycle (+22 GiB per training case on a GPU)."""
    import gc

    common, training = speed.common, speed.training
    common.load_models()
    device = common.Device(torch.device("cpu"))
    sizes = common.sizes_for(device, smoke=True)
    setup = training.make_train_setup(sizes, device)
    net = build_network(common.network_config(sizes, small_gate=False)).train()
    step = training.TrainStep(net, training.TRAIN_CASES[0], setup)

    def live() -> int:
        gc.collect()
        return sum(type(o) is torch.Tensor for o in gc.get_objects())

    assert step.saved_mib() > 0
    before = live()
    step.saved_mib()
    assert live() == before


def _open_tiny_network():
    torch.manual_seed(0)
    net = build_network(NetworkConfig(layers=4, base_channels=4, num_classes=3)).eval()
    for node in net.nodes.values():
        pin_gate(node.gate, [True] * len(node.paths))
    return net


def test_numerics_check_sees_layout_as_equal_and_bf16_as_close_but_different(speed):
    common, inference = speed.common, speed.inference
    net = _open_tiny_network()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 96) * 40.0  # (B, 3, H, W)

    reference = inference.InferRunner(net, inference.InferCase("fp32")).logits(images)
    channels_last = inference.InferRunner(net, inference.InferCase("cl", channels_last=True))
    bf16 = inference.InferRunner(net, inference.InferCase("bf16", bf16_weights=True,
                                                  channels_last=True))

    same = common.compare(channels_last.logits(images), reference, tol=common.FP32_RTOL)
    assert same.rel < 1e-5 and same.ok
    close = common.compare(bf16.logits(images), reference, tol=common.BF16_RTOL)
    assert close.rel > 1e-4, "bf16 weights should change the logits"
    assert close.ok
    # The runners worked on copies: the source network is untouched.
    first = net.stem[0].weight
    assert first.dtype == torch.float32 and first.is_contiguous()


def test_compare_fails_on_wrong_or_nan_results(speed):
    common = speed.common
    ref = torch.linspace(-3.0, 5.0, 100)
    assert common.compare(ref.clone(), ref, tol=common.FP32_RTOL).rel == 0.0
    off = common.compare(ref * 1.01, ref, tol=common.FP32_RTOL)
    assert not off.ok and off.max_abs == pytest.approx(0.05, rel=1e-3)
    assert not common.compare(torch.full_like(ref, float("nan")), ref, tol=common.BF16_RTOL).ok
    with pytest.raises(ValueError, match="shapes differ"):
        common.compare(ref[:10], ref, tol=common.FP32_RTOL)
