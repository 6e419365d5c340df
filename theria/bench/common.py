"""Timing, peak memory, environment and table helpers shared by the benchmark suites."""

from __future__ import annotations

import argparse
import gc
import resource
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from theria._environment import environment

__all__ = [
    "DEFAULT_OUT",
    "RESULTS_DIR",
    "Progress",
    "command_line",
    "device_kernel_ms",
    "device_kernel_times",
    "environment",
    "markdown_table",
    "measure",
    "ratios",
    "refs_calls",
    "same_dtype_sdpa",
    "target_cells",
    "write_result",
]

RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "results"  # committed tables
# Where a suite writes without --out: outside the committed tables (which change only when a
# run is meant to replace them: --out experiments/results), relative to the working directory.
DEFAULT_OUT = Path("outputs") / "bench"


class Progress:
    """`[k/n] what · 12 s elapsed · ETA 30 s` lines (flushed) for a suite of `total` items; the
    ETA is the mean time per finished item times the items left."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = (f"ETA {elapsed / self.done * (self.total - self.done):.0f} s" if self.done
               else "ETA unknown")  # fmt: skip
        self.done += 1
        print(f"[{self.label} {self.done}/{self.total}] {what} · {elapsed:.0f} s elapsed · "
              f"{eta}", flush=True)  # fmt: skip


def _exact_cpu_rss() -> None:
    """Make the resident set track live CPU tensors: glibc otherwise raises its mmap threshold
    after large frees and keeps freed blocks, so a peak above a baseline would read too low.
    With a fixed threshold, blocks over 1 MiB are mmapped and returned on free."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
        libc.mallopt(m_mmap_threshold, 1 << 20)
        libc.mallopt(m_trim_threshold, 1 << 20)
    except (OSError, AttributeError):  # not glibc: the sampled RSS is then an upper bound
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _CpuPeak:
    """Peak resident memory above a baseline, sampled in a thread (CPU has no allocator stats)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def __enter__(self) -> _CpuPeak:
        gc.collect()
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self.peak = max(self.peak, self._rss())
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(
    fn: Callable[[], Any], device: torch.device | str, repeats: int = 5, warmup: int = 1
) -> dict[str, float]:
    """Median wall time (ms) over `repeats` calls after `warmup`, and peak extra memory (MB)
    of one call: CUDA allocator peak above the live memory before the call, or on the CPU the
    peak resident set above the level before the call. Returns {"ms", "ms_min", "peak_mb"}.
    An out-of-memory error is returned as {"oom": 1.0}."""
    device = torch.device(device)
    if device.type == "cpu":
        _exact_cpu_rss()
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            with _CpuPeak() as mon:
                fn()
            peak = mon.extra / 2**20
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"oom": 1.0}
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mb": peak}


def device_kernel_times(
    fn: Callable[[], Any], device: torch.device, calls: int = 1
) -> dict[str, tuple[float, float]]:
    """{CUDA kernel: (launches per call, ms per call)} of `fn` over `calls` back-to-back calls
    under torch.profiler with the CUDA activity only (so the host is not slowed by tracing)."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    return {
        e.key: (e.count / calls, e.self_device_time_total / 1e3 / calls)
        for e in prof.key_averages()
        if getattr(e, "device_type", None) is not None
        and "cuda" in str(e.device_type).lower()
        and e.self_device_time_total > 0
    }


def device_kernel_ms(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """CUDA kernel time (ms) per call of `fn` (`device_kernel_times` summed)."""
    return sum(ms for _, ms in device_kernel_times(fn, device, calls).values())


def ratios(
    records: Sequence[Mapping[str, Any]],
    group: Sequence[str],
    reference: Mapping[str, tuple[str, str]],
    field: str = "ms",
) -> list[float | None]:
    """Each record's `field` over that of its reference record: the record with the same
    values of the keys `group` whose ("mode", "path") is `reference[record["mode"]]`.

    A record is a mapping with at least "mode" and "path"; a measured one has `field` (a
    failed one has not). The result is aligned with `records`: None where the record's mode
    has no reference, or either value is missing or the reference is zero."""
    index = {(tuple(r[g] for g in group), r["mode"], r["path"]): r.get(field) for r in records}
    out: list[float | None] = []
    for r in records:
        ref = reference.get(r["mode"])
        base = index.get((tuple(r[g] for g in group), *ref)) if ref is not None else None
        value = r.get(field)
        out.append(value / base if value is not None and base else None)
    return out


def target_cells(
    ours: Mapping[str, Any] | None,
    ref: Mapping[str, Any] | None,
    limit: float,
    goal: float | None = None,
    field: str = "ms",
) -> list[Any]:
    """[ours, reference, ratio, limit, ratio − limit, verdict] for a target "ours / ref ≤
    limit" (an optional tighter `goal` is reported next to the limit). Verdict: "met",
    "NOT met", or "not measured" when the reference has no `field`; a missing `ours` is
    "NOT met" (the path that the target is about did not run), its error in the ratio cell.
    A record's error is its "error" value."""

    def why(r: Mapping[str, Any] | None) -> str:
        return "not run" if r is None else str(r.get("error", "not measured"))

    lim = f"{limit:g}" + (f" (goal {goal:g})" if goal is not None else "")
    a = None if ours is None else ours.get(field)
    b = None if ref is None else ref.get(field)
    if a is None:
        return ["", "" if b is None else b, f"ours: {why(ours)}", lim, "", "NOT met"]
    if b is None or b <= 0:
        what = why(ref) if b is None else f"{field} = {b}"
        return [a, "" if b is None else b, f"reference: {what}", lim, "", "not measured"]
    r = a / b
    gap = f"{r - limit:+.2f}" + (f" (goal {r - goal:+.2f})" if goal is not None else "")
    return [a, b, f"{r:.2f}", lim, gap, "met" if r <= limit else "NOT met"]


def refs_calls(run: Callable[[], Any]) -> int:
    """How many Python functions of torch._refs (PyTorch's Python reference ops) one call of
    `run` enters. In eager mode they run as the meta functions of ZeroTensor arithmetic, which
    forward-mode AD makes where an op mixes a dual tensor with a plain one
    (`theria.autodiff.hvp`'s docstring): a count of host time spent there."""
    n = [0]

    def count(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and "/torch/_refs/" in frame.f_code.co_filename.replace("\\", "/"):
            n[0] += 1

    previous = sys.getprofile()
    sys.setprofile(count)
    try:
        run()
    finally:
        sys.setprofile(previous)
    return n[0]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(
    name: str, title: str, env: dict[str, str], body: str, out_dir: Path | None = None
) -> Path:
    """Write `body` (markdown) under `out_dir`/<name>.md (default DEFAULT_OUT, outputs/bench;
    the committed tables are under RESULTS_DIR) with an environment header; returns the path.
    Prints the same text."""
    out_dir = DEFAULT_OUT if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    text = f"# {title}\n\n{header}\n\n{body}\n"
    path = out_dir / f"{name}.md"
    path.write_text(text)
    print(text)
    print(f"written: {path}")
    return path


def command_line(
    prog: str,
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    always: Sequence[str] = ("device",),
    omit: Sequence[str] = ("out",),
) -> str:
    """`prog` with the flags that reproduce `args` (shell-quoted): every option whose value
    differs from its default, plus the `always` ones that exist; `omit` (where results go)
    never."""
    parts = [prog]
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest == "help" or dest in omit:
            continue
        value = getattr(args, dest)
        if value == action.default and dest not in always:
            continue
        flag = action.option_strings[0]
        if isinstance(value, bool):  # store_true / store_false: the flag is the value
            parts.append(flag)
        elif isinstance(value, list) and isinstance(action, argparse._AppendAction):
            parts.extend(f"{flag} {shlex.quote(str(x))}" for x in value)  # one flag per value
        elif isinstance(value, list):
            parts.append(" ".join([flag, *(shlex.quote(str(x)) for x in value)]))
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def same_dtype_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention composed of plain torch ops in the inputs' dtype, differentiable to any order:
    the yardstick of the 2× accuracy rule ("error against float64 at most twice that of the
    same computation in the same dtype", as flash-attention's tests take it with their
    reference's upcast=False). Neither theria's `reference` backend (it computes 16-bit inputs
    in float32) nor PyTorch's math SDPA on CUDA (torch 2.11 computes 16-bit inputs in float32
    too: its bf16 error equals the output's rounding) is such a computation. Shapes as
    `F.scaled_dot_product_attention`."""
    from theria.attention.contract import canonicalize
    from theria.attention.reference import reference_attention

    c = canonicalize(q, k, v, attn_mask, 0.0, is_causal, None, enable_gqa, 64)
    return c.restore(reference_attention(c.q, c.k, c.v, c.mask, c.problem, upcast=False))
