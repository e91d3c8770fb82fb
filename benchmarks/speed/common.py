"""What every section of gpu_bench.py shares: loading the model code without installing dynroute,
the device, the time budget, the numerics checks, the result rows, the sizes, and timing, counting
and compiling helpers."""

from __future__ import annotations

import contextlib
import gc
import importlib.machinery
import importlib.util
import logging
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
MODELS_PACKAGE = "dynroute.models"
SEED = 0
NUM_CLASSES = 19
FP32_RTOL = 1e-4
TF32_RTOL = 1e-2  # cuDNN's TF32 convs keep 10 mantissa bits (~5e-4 per rounding), over 16 rows
BF16_RTOL = 5e-2


def _cannot_load(message: str) -> SystemExit:
    print(f"gpu_bench: {message}", file=sys.stderr)
    return SystemExit(2)


def load_models(models_dir: Path = ROOT / "models") -> ModuleType:
    """Import `models_dir` as the package `dynroute.models` and return it.

    Why this way: the GPU machine has only PyTorch. The repository is copied there but not
    pip-installed (dynroute's own dependencies include Ray, MLflow and DVC), so `import
    dynroute.models` finds nothing. The folder is called `models`, not `dynroute/models`, and its
    modules import each other relatively (`from .cost import ...`) while the scripts we reuse
    import it as `dynroute.models`; adding the repository root to sys.path would neither give it
    that name nor be safe (our platform/ folder would shadow the standard library's `platform`).
    So the importlib machinery registers it under its real name: an empty `dynroute` package,
    then `dynroute.models` from models/__init__.py with models/ as its submodule search path.
    """
    init = models_dir / "__init__.py"
    if not init.is_file():
        raise _cannot_load(f"{init} not found: run the benchmark from a checkout of the "
                           f"repository")
    loaded = sys.modules.get(MODELS_PACKAGE)
    if loaded is not None:
        where = Path(loaded.__file__ or "").resolve().parent
        if where != models_dir.resolve():
            raise _cannot_load(f"{MODELS_PACKAGE} is already imported from {where}, not "
                               f"{models_dir}; run the benchmark in a fresh interpreter")
        return loaded
    if "dynroute" not in sys.modules:
        spec = importlib.machinery.ModuleSpec("dynroute", None, is_package=True)
        sys.modules["dynroute"] = importlib.util.module_from_spec(spec)  # __path__ = []
    spec = importlib.util.spec_from_file_location(
        MODELS_PACKAGE, init, submodule_search_locations=[str(models_dir)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODELS_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as err:
        for name in [n for n in sys.modules if n.startswith(MODELS_PACKAGE)]:
            del sys.modules[name]
        raise _cannot_load(
            f"loading {models_dir} needs the module {err.name!r}, which is not installed here. "
            f"models/ must import only torch and numpy at module level (this benchmark runs "
            f"where only PyTorch is installed); make that import lazy in models/.") from err
    sys.modules["dynroute"].models = module  # type: ignore[attr-defined]
    return module


def load_file(name: str, path: Path) -> ModuleType:
    """Import one script by path (it imports `dynroute.models`, so call `load_models` first)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise _cannot_load(f"{path} not found: run the benchmark from a checkout of the "
                           f"repository")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(module)
    return module


def configure_torch() -> None:
    # Per-block compilation makes one graph per (block kind, scale), and the dynamic scenarios
    # change routes: both need more than the default 8 entries per code object.
    torch._dynamo.config.recompile_limit = 64
    # Graph-break warnings are counted and reported in the tables instead.
    torch._logging.set_logs(dynamo=logging.ERROR)


def select_device(name: str) -> Device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this PyTorch build")
    return Device(torch.device(name))


@dataclass(frozen=True)
class Device:
    torch: torch.device

    @property
    def cuda(self) -> bool:
        return self.torch.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.torch)

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.torch)

    def peak_mib(self) -> float | None:
        """Peak allocated since `reset_peak` (CUDA); None on CPU (no per-case figure)."""
        return torch.cuda.max_memory_allocated(self.torch) / 2**20 if self.cuda else None

    def autocast(self, enabled: bool, *, cache: bool = True) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.torch.type, dtype=torch.bfloat16, enabled=enabled,
                              cache_enabled=cache)


class Clock:
    """The run's time budget, split into section shares; unused time flows to later sections."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds
        self.section_deadline = self.deadline

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def section_left(self) -> float:
        return self.section_deadline - time.perf_counter()

    def start_section(self, share: float) -> None:
        self.section_deadline = time.perf_counter() + max(0.0, self.left()) * share

    def repeats(self, wanted: int, one_run_s: float, cases_left: int) -> int:
        """As many of `wanted` repeats as this case's share of the section's time allows."""
        share = self.section_left() / max(1, cases_left)
        return max(1, min(wanted, int(share / max(one_run_s, 1e-6))))


@dataclass(frozen=True)
class Check:
    """A result against fp32 eager: the max abs difference and the relative difference `rel`
    (max-based in `compare`, norm-based in `compare_l2`), within `tol` or not."""

    max_abs: float
    rel: float
    tol: float
    ok: bool


def compare(candidate: torch.Tensor, reference: torch.Tensor, *, tol: float) -> Check:
    """The numerics check: max |candidate − reference| / max |reference| ≤ tol (NaN fails)."""
    a, b = candidate.detach().float().cpu(), reference.detach().float().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item()
    scale = b.abs().max().item()
    rel = diff / scale if scale > 0 else diff
    return Check(max_abs=diff, rel=rel, tol=tol, ok=bool(rel <= tol))


def compare_l2(candidate: torch.Tensor, reference: torch.Tensor, *, tol: float) -> Check:
    """||candidate − reference|| / ||reference|| ≤ tol, for gradients (NaN fails)."""
    a, b = candidate.detach().double().cpu(), reference.detach().double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = a - b
    norm = b.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    return Check(max_abs=diff.abs().max().item(), rel=rel, tol=tol, ok=bool(rel <= tol))


def tolerance(bf16: bool, device: Device) -> float:
    if bf16:
        return BF16_RTOL
    if device.cuda and torch.backends.cudnn.allow_tf32:
        return TF32_RTOL
    return FP32_RTOL


@dataclass
class Row:
    """One case of one section; `status` is "ok", "failed: <reason>" or "skipped: <reason>"."""

    section: str
    case: str
    status: str = "ok"
    images_per_s: float | None = None  # train: per step; infer: at the throughput batch
    ms: float | None = None  # train: per step; infer: at batch 1
    peak_mib: float | None = None
    first_s: float | None = None  # first step / call: includes compilation
    repeats: int = 0
    check: Check | None = None  # train: the first losses; infer: the logits
    grad_check: Check | None = None  # train: the first step's gradient
    note: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    layers: int
    base_channels: int
    train_batch: int
    crop: tuple[int, int]
    infer_size: tuple[int, int]
    infer_batch: int
    train_repeats: int
    infer_repeats: int
    compile_backend: str
    compile_floor_s: float  # a compile case is tried only with this much section time left
    # Training compiles far longer: on an H100 (torch 2.11) inductor had not finished compiling
    # the L=16 training step after ~410 s (benchmarks/results/*-compile-timeout.log).
    train_compile_floor_s: float = 0.0
    # The budgeted networks' ×0.25 gate. Off at CPU sizes: from a 128 crop the coarsest gate
    # would read a 1×1 map, and batch norm over 2 numbers makes the gradient ill-conditioned
    # (norm ~170 instead of ~0.6, fp32 and bf16 gradients uncorrelated).
    small_gate: bool = False


def sizes_for(device: Device, smoke: bool) -> Sizes:
    if smoke:
        return Sizes(4, 4, 2, (64, 64), (64, 128), 2, 1, 1, "eager", 0.0)
    if device.cuda:
        return Sizes(16, 64, 8, (768, 768), (1024, 2048), 8, 20, 30, "inductor", 90.0,
                     train_compile_floor_s=600.0, small_gate=True)
    return Sizes(4, 8, 2, (128, 128), (128, 256), 8, 20, 40, "inductor", 30.0)


def median_time(fn: Callable[[], object], device: Device, repeats: int) -> float:
    """Median wall time of `fn` over `repeats`, synchronising the device around each call."""
    times = []
    for _ in range(repeats):
        device.sync()
        start = time.perf_counter()
        fn()
        device.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

# Operators that launch no kernel: views and aliases, and allocation.
_NO_KERNEL = {"empty", "empty_strided", "lift_fresh", "_to_copy_noop"}


def count_ops(fn: Callable[[], object]) -> int:
    """ATen operators `fn` dispatches that compute something (views, aliases and allocations
    left out): about the kernels it launches eagerly, the same on every device, so a CPU run
    shows what removes launches on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in _NO_KERNEL:
                Counter.count += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.count


def describe_error(err: BaseException) -> str:
    """A failed case's status: the error's type and first line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:140] if text else ''}"


def progress(message: str) -> None:
    """Which case runs now, on stderr (the tables go to stdout)."""
    print(f"  ... {message}", file=sys.stderr, flush=True)


def dynamo_counts() -> tuple[int, Counter]:
    """Dynamo's graphs so far and its graph breaks by reason."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], Counter(counters["graph_break"])


def graph_note(before: tuple[int, Counter]) -> str:
    """The graphs and graph breaks since `before` (from `dynamo_counts`), for a case's note."""
    graphs, breaks = dynamo_counts()
    new = breaks - before[1]
    note = f"{graphs - before[0]} graphs, {sum(new.values())} graph breaks"
    if new:
        reason, count = new.most_common(1)[0]
        note += f" (most: {count}x {reason.splitlines()[0][:70]})"
    return note


def compile_fn(fn, *, backend: str, mode: str | None):
    """torch.compile with static shapes; `mode` only where the backend is inductor."""
    return torch.compile(fn, backend=backend, mode=mode if backend == "inductor" else None,
                         dynamic=False)


def compile_blocks(net: nn.Module, *, backend: str, mode: str | None) -> None:
    """Compile every block in place; the routing between them stays eager Python."""
    blocks: list[nn.Module] = [net.stem, *net.decoder.levels, net.head]
    for node in net.nodes.values():
        blocks += [node.cell, node.gate, *node.transforms.values()]
    for block in blocks:
        block.compile(backend=backend, mode=mode if backend == "inductor" else None,
                      dynamic=False)


def network_config(sizes: Sizes, *, small_gate: bool):
    """The benchmark's network at these sizes (a `dynroute.models.NetworkConfig`)."""
    from dynroute.models import NetworkConfig

    return NetworkConfig(layers=sizes.layers, base_channels=sizes.base_channels,
                         num_classes=NUM_CLASSES, small_gate=small_gate)


def skip_reason(compiled: bool, optional: bool, index: int, clock: Clock, estimate: float,
                 no_compile: bool) -> str:
    """Why the case at `index` of a section does not run ("" when it does): compile cases
    need their estimated compile time, doubled when optional, left in the section."""
    if index == 0:
        return ""  # the baseline always runs
    if compiled and no_compile:
        return "--no-compile"
    if clock.left() <= 0:
        return "time budget spent"
    need = estimate * (2 if optional else 1) if compiled else 0.0
    if compiled and clock.section_left() < need:
        return f"time budget ({clock.section_left():.0f}s left, compiling needs ~{need:.0f}s)"
    return ""
