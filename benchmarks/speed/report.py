"""The tables gpu_bench.py prints: one per section, with ratios to the eager fp32 baseline and,
at the issue's sizes on CUDA, the reference implementation's figures and the goals."""

from __future__ import annotations

from collections.abc import Callable

from .common import Check, Device, Row, Sizes
from .dynamic import DYNAMIC_TOLERANCE, MIXED_CASE
from .training import BUDGET_NAME, CHECK_STEPS, GRAD_CLIP

# The paper's reference implementation on one H100 80GB, torch 2.11 (quoted in the issue).
REFERENCE = {
    "train": {"eager fp32 (baseline)": 28.6, "bf16 autocast": 28.0,
              "bf16 autocast + channels-last": 28.9},  # images/s, L=16, batch 8, 768x768
    "infer": {"eager fp32 (baseline)": 59.8, "bf16 autocast": 73.9},  # ms, batch 1, 1024x2048
}

GOAL_TRAIN_IPS = 86.0
GOAL_INFER_MS = 15.0


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return "n/a" if not numerator or not denominator else f"{numerator / denominator:.2f}x"


def _ref(refs: dict[str, float], case: str) -> str:
    return f"{refs[case]:.1f}" if case in refs else ""


def _check_cells(check: Check | None) -> list[str]:
    if check is None:
        return ["", "", ""]
    mark = "✓" if check.ok else "✗"
    return [f"{check.max_abs:.2e}", f"{check.rel:.2e}", f"{mark} ≤{check.tol:.0e}"]


def _train_check_cells(row: Row) -> list[str]:
    cells = []
    for check in (row.check, row.grad_check):
        mark = "" if check is None else "✓" if check.ok else "✗"
        cells.append("n/a" if check is None else f"{check.rel:.2e} {mark}≤{check.tol:.0e}")
    return cells


def _lines(rows: list[Row], cells: Callable[[Row], list[str]]) -> list[list[str]]:
    """A table's lines: `cells(row)` for each measured case, the status of a failed or skipped
    one (the mixed-routes check is reported below the dynamic table instead)."""
    return [cells(r) if r.status == "ok" else [r.case, r.status]
            for r in rows if r.case != MIXED_CASE]


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    full = [r for r in rows if len(r) == len(headers)]
    widths = [max(len(h), *(len(r[i]) for r in full)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                    for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for r in rows:
        if len(r) == 2:  # a failed or skipped case: its status spans the row
            print(f"{r[0].ljust(widths[0])}  {r[1]}")
            continue
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def report_train(rows: list[Row], sizes: Sizes, device: Device, reference_sizes: bool) -> None:
    base = rows[0]
    refs = REFERENCE["train"] if device.cuda and reference_sizes else {}
    headers = ["case", "img/s", "speedup", "ms/step", "ops", "peak MiB", "saved MiB", "1st step s",
               "losses Δ rel", "grad Δ rel (L2)"] + (["ref img/s"] if refs else [])
    table = _lines(rows, lambda r: [
        r.case, _fmt(r.images_per_s, ".2f"), _ratio(r.images_per_s, base.images_per_s),
        _fmt(r.ms, ".1f"), _fmt(r.extra.get("ops"), "d"), _fmt(r.peak_mib, ".0f"),
        _fmt(r.extra.get("saved_mib"), ".1f"), _fmt(r.first_s, ".1f"), *_train_check_cells(r),
        *([_ref(refs, r.case)] if refs else [])])
    h, w = sizes.crop
    print_table(f"(a) training step: L={sizes.layers}, C0={sizes.base_channels}, batch "
                f"{sizes.train_batch}, {h}x{w}, SGD + {BUDGET_NAME} budget loss + clip "
                f"{GRAD_CLIP}{', small gate' if sizes.small_gate else ''}; vs fp32 eager: losses "
                f"of the first {CHECK_STEPS} steps (max |Δ| / max |ref|) and the first step's "
                f"gradient (||Δ|| / ||ref||); ops: operators run per step (views left out); "
                f"saved MiB: activations kept for the backward pass",
                headers, table)
    for r in rows:
        if r.note:
            print(f"  {r.case}: {r.note}")
    if refs:
        best = max((r.images_per_s for r in rows if r.images_per_s and r.check and r.check.ok
                    and r.grad_check and r.grad_check.ok), default=0.0)
        print(f"  reference (paper impl., H100, torch 2.11): fp32 28.6, bf16 28.0, bf16+CL 28.9 "
              f"img/s; goal >= {GOAL_TRAIN_IPS:.0f} img/s: best here {best:.1f} "
              f"{'✓' if best >= GOAL_TRAIN_IPS else '✗'}")


def report_infer(rows: list[Row], sizes: Sizes, device: Device, reference_sizes: bool) -> None:
    base = rows[0]
    refs = REFERENCE["infer"] if device.cuda and reference_sizes else {}
    headers = ["case", "b1 ms", "speedup", f"b{sizes.infer_batch} img/s", "speedup", "b1 ops",
               "peak MiB", "1st call s", "logits Δ abs", "Δ rel", "check"] + (
                   ["ref ms"] if refs else [])
    table = _lines(rows, lambda r: [
        r.case, _fmt(r.ms, ".2f"), _ratio(base.ms, r.ms), _fmt(r.images_per_s, ".2f"),
        _ratio(r.images_per_s, base.images_per_s), _fmt(r.extra.get("ops"), "d"),
        _fmt(r.peak_mib, ".0f"), _fmt(r.first_s, ".1f"), *_check_cells(r.check),
        *([_ref(refs, r.case)] if refs else [])])
    h, w = sizes.infer_size
    print_table(f"(b) inference, every path open: L={sizes.layers}, C0={sizes.base_channels}, "
                f"{h}x{w}; latency at batch 1, throughput at batch {sizes.infer_batch}, median "
                f"of {base.repeats} interleaved rounds; logits Δ vs fp32 eager", headers, table)
    for r in rows:
        if r.note:
            print(f"  {r.case}: {r.note}")
    if refs:
        passed = [r for r in rows if r.ms and r.check and r.check.ok]
        routed = [r.ms for r in passed if "static" not in r.note]
        static = [r.ms for r in passed if "static" in r.note]
        best = min(routed, default=float("inf"))
        print(f"  reference (paper impl., H100, torch 2.11): fp32 59.8 ms, bf16 73.9 ms; goal <= "
              f"{GOAL_INFER_MS:.0f} ms: best per-sample routing {best:.1f} ms "
              f"{'✓' if best <= GOAL_INFER_MS else '✗'}, best static "
              f"{min(static, default=float('nan')):.1f} ms")


def report_dynamic(rows: list[Row], sizes: Sizes) -> None:
    headers = ["path / scenario", "GFLOPs", "FLOPs ratio", "ms", "latency ratio", "lat/FLOPs",
               f"within {DYNAMIC_TOLERANCE:.0%}", "host waits"]
    table = _lines(rows, lambda r: [
        r.case, f"{r.extra['gflops']:.3g}", f"{r.extra['flops_ratio']:.3f}", f"{r.ms:.2f}",
        f"{r.extra['latency_ratio']:.3f}", f"{r.extra['latency_over_flops']:.3f}",
        "✓" if r.extra["within_tolerance"] else "✗", _fmt(r.extra["host_waits"], "d")])
    h, w = sizes.infer_size
    repeats = max((r.repeats for r in rows), default=0)
    print_table(f"(c) dynamic savings: routes pinned through the real gates, batch 1, {h}x{w}, "
                f"median of {repeats} interleaved repeats", headers, table)
    for r in rows:
        if r.case == MIXED_CASE and r.check is not None:
            print(f"  {r.case}: max |Δ| / max |ref| {r.check.rel:.1e} "
                  f"{'✓' if r.check.ok else '✗'} ({r.note})")
    measured = [r for r in rows if r.status == "ok" and r.case != MIXED_CASE]
    within = sum(r.extra["within_tolerance"] for r in measured)
    print(f"  latency follows real FLOPs within {DYNAMIC_TOLERANCE:.0%} for {within} of "
          f"{len(measured)} path/scenario pairs")
