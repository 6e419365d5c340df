"""Host (CPU) cost per call of theria's attention paths next to PyTorch's SDPA, at a size whose
GPU work is tiny, so that what is left is the Python and dispatch overhead of each call.

    python -m theria.bench overhead [--device cuda|cpu] [--dtype bf16] [--size 16] [--dim 64]
                                    [--calls 200] [--rounds 5] [--modes fwd ...] [--out DIR]

Shapes (B, H, N, D) = (1, 1, 16, 64) by default, self-attention L = S = N, no mask. One call:

    fwd       out = attention(q, k, v)                        (inputs not requiring grad)
    fwd+bwd   torch.autograd.grad(attention(q, k, v), (q, k, v), dO)
    fwd+jvp   torch.func.jvp(attention, (q, k, v), (q̇, k̇, v̇)), or theria's fused
              `triton_impl.sdpa_jvp` (one kernel pass, no autograd)
    rev_rev   theria.autodiff.hvp(ℓ, (q, k, v), (u_q, u_k, u_v), "rev_rev") with
              ℓ = ‖attention(q, k, v)‖² (as `python -m theria.bench hvp`)
    fwd_rev   the same, "fwd_rev" (∇ℓ by autograd on dual tensors, forward-over-reverse)

Paths: `theria.sdpa triton` (`theria.sdpa(backend="triton")`; for fwd+bwd also with the
backward on the calling thread, `torch.autograd.set_multithreading_enabled(False)`, next to
SDPA cuDNN run the same way: PyTorch's default engine hands a CUDA backward to a worker
thread, which theria's own drivers avoid, theria/_engine.py; rev_rev and fwd_rev go through
`theria.autodiff.hvp`, which does so for every path), `theria kernels only` (fwd,
fwd+bwd: `triton_impl.forward` / `backward` called directly on the tensors: no argument checks,
no autograd.Function), `theria sdpa_jvp (fused)`, for fwd_rev also `torch.func.jvp` of
`torch.func.grad` (the route of torch.func users; theria.autodiff takes dual tensors);
PyTorch's `SDPA default` (its own dispatch), `SDPA cuDNN`
(`sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`) and `SDPA math`
(`sdpa_kernel(SDPBackend.MATH)`, PyTorch's only path with forward AD and double backward). A
PyTorch kernel is selected once around the timed loop, so the selection is not in the call. A
path that raises is reported with its error.

Measure: after `--warmup` calls, `--rounds` rounds of `--calls` calls issued back to back with
one synchronize at the end of each round (Python's garbage collector off, as in timeit), medians
over the rounds:

    µs wall/call   the round's wall time / calls: host and GPU overlap, so with tiny GPU work
                   this is the rate at which the host issues calls
    µs CPU/call    time.process_time() from the first call to the last one returning (before the
                   synchronize) / calls: the host overhead. It counts every thread of the
                   process (PyTorch runs a CUDA backward pass on its own device thread), so it
                   can exceed the wall time
    µs GPU/call    CUDA kernel time per call (torch.profiler, CUDA activity only) over
                   `--profile-calls` calls; CUDA only

`× SDPA`: wall (CPU) time over that of the mode's PyTorch reference: `SDPA default` for fwd and
fwd+bwd, `SDPA math` for fwd+jvp, rev_rev and fwd_rev (the only PyTorch path that has them).

`--device cpu` (a smoke run, e.g. for tests): theria's `torch` backend, `SDPA default` and
`SDPA math`; no kernels-only, fused-JVP, cuDNN or GPU rows. On a shared CPU run it with
OMP_NUM_THREADS=1: intra-op threads that wait for a busy core inflate both times many-fold.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria import autodiff
from theria.bench.common import (
    Progress,
    _sync,
    command_line,
    device_kernel_ms,
    environment,
    markdown_table,
    ratios,
    write_result,
)
from theria.bench.hvp import _loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "fwd+bwd", "fwd+jvp", "rev_rev", "fwd_rev")
DEFAULT, CUDNN, MATH = "SDPA default", "SDPA cuDNN", "SDPA math"
REFERENCE = {"fwd": DEFAULT, "fwd+bwd": DEFAULT, "fwd+jvp": MATH, "rev_rev": MATH,
             "fwd_rev": MATH}  # fmt: skip
KERNELS_ONLY = "theria kernels only"
FUSED_JVP = "theria sdpa_jvp (fused)"

CALLING = ", calling-thread backward"  # torch.autograd.set_multithreading_enabled(False)


def _calling_thread() -> AbstractContextManager:
    return torch.autograd.set_multithreading_enabled(False)


def _calling_thread_and(backend: SDPBackend) -> Callable[[], AbstractContextManager]:
    def both() -> AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autograd.set_multithreading_enabled(False))
        stack.enter_context(sdpa_kernel(backend))
        return stack

    return both


# One timed path: a call of no arguments, and the context entered once around its loop.
Call = tuple[Callable[[], Any], Callable[[], AbstractContextManager]]


def _kernel(backend: SDPBackend) -> Callable[[], AbstractContextManager]:
    return lambda: sdpa_kernel(backend)


def paths(mode: str, x: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, Call]:
    """The timed calls of one mode on inputs x = (q, k, v, q̇, k̇, v̇, dO), each (B, H, N, D):
    theria's paths first, then PyTorch's."""
    q, k, v, tq, tk, tv, do = x
    leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))  # for fwd+bwd

    def call(f: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        """One call of `mode` through the attention function f(q, k, v)."""
        if mode == "fwd":
            return lambda: f(q, k, v)
        if mode == "fwd+bwd":
            return lambda: torch.autograd.grad(f(*leaves), leaves, do)
        if mode == "fwd+jvp":
            return lambda: torch.func.jvp(f, (q, k, v), (tq, tk, tv))
        loss = _loss(f)
        return lambda: autodiff.hvp(loss, (q, k, v), (tq, tk, tv), mode)

    cuda = device.type == "cuda"
    backend = "triton" if cuda else "torch"
    none = contextlib.nullcontext

    def theria_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return theria.sdpa(q, k, v, backend=backend)

    out: dict[str, Call] = {f"theria.sdpa {backend}": (call(theria_attn), none)}
    if mode == "fwd_rev":  # the route torch.func users take (theria.autodiff: dual tensors)
        loss = _loss(theria_attn)
        grad_of_loss = torch.func.grad(loss, argnums=(0, 1, 2))
        out[f"theria.sdpa {backend}, torch.func jvp of grad"] = (
            lambda: torch.func.jvp(grad_of_loss, (q, k, v), (tq, tk, tv)),
            none,
        )
    if cuda and mode in ("fwd", "fwd+bwd", "fwd+jvp"):
        from theria.attention import triton_impl
        from theria.attention.contract import Problem

        problem = Problem(scale=q.shape[-1] ** -0.5, is_causal=False)

        def kernels() -> Any:
            if mode == "fwd+jvp":
                return triton_impl.sdpa_jvp(q, k, v, tq, tk, tv)
            o, lse = triton_impl.forward(q, k, v, None, problem)
            if mode == "fwd":
                return o, lse
            return triton_impl.backward(q, k, v, None, problem, o, lse, do)

        out[FUSED_JVP if mode == "fwd+jvp" else KERNELS_ONLY] = (kernels, none)
    sdpa = F.scaled_dot_product_attention
    if mode in ("fwd", "fwd+bwd"):
        out[DEFAULT] = (call(sdpa), none)
        if cuda:
            out[CUDNN] = (call(sdpa), _kernel(SDPBackend.CUDNN_ATTENTION))
        if cuda and mode == "fwd+bwd":  # PyTorch's default engine: a worker thread's backward
            out[f"theria.sdpa {backend}{CALLING}"] = (call(theria_attn), _calling_thread)
            cudnn_ct = _calling_thread_and(SDPBackend.CUDNN_ATTENTION)
            out[f"{CUDNN}{CALLING}"] = (call(sdpa), cudnn_ct)
    else:
        out[MATH] = (call(sdpa), _kernel(SDPBackend.MATH))
    return out


def per_call(
    fn: Callable[[], Any],
    device: torch.device,
    calls: int = 200,
    rounds: int = 5,
    warmup: int = 20,
    profile_calls: int = 0,
) -> dict[str, float]:
    """{"wall_us", "cpu_us"} per call (medians over `rounds` rounds of `calls` back-to-back
    calls, one synchronize per round) and, with `profile_calls` on CUDA, "gpu_us": CUDA kernel
    time per call. See the module docstring."""
    for _ in range(warmup):
        fn()
    _sync(device)
    walls, cpus = [], []
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            c1 = time.process_time()
            _sync(device)
            t1 = time.perf_counter()
            walls.append((t1 - t0) / calls * 1e6)
            cpus.append((c1 - c0) / calls * 1e6)
    finally:
        if enabled:
            gc.enable()
    m = {"wall_us": statistics.median(walls), "cpu_us": statistics.median(cpus)}
    if profile_calls and device.type == "cuda":
        m["gpu_us"] = device_kernel_ms(fn, device, profile_calls) * 1e3
    return m


HEADERS = ["mode", "path", "µs wall/call", "µs CPU/call", "µs GPU/call", "× SDPA wall",
           "× SDPA CPU"]  # fmt: skip


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """Rows of HEADERS; `× SDPA` relative to REFERENCE[mode] (the reference row shows 1.00)."""
    reference = {m: (m, p) for m, p in REFERENCE.items()}
    x_wall = ratios(records, (), reference, field="wall_us")
    x_cpu = ratios(records, (), reference, field="cpu_us")
    rows = []
    for r, xw, xc in zip(records, x_wall, x_cpu, strict=True):
        if "wall_us" not in r:
            rows.append([r["mode"], r["path"], r.get("error", "?"), "", "", "", ""])
            continue
        rel = ["" if x is None else f"{x:.2f}" for x in (xw, xc)]
        gpu = r.get("gpu_us", "")
        rows.append([r["mode"], r["path"], r["wall_us"], r["cpu_us"], gpu, *rel])
    return rows


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--size", type=int, default=16, help="L = S = N")
    ap.add_argument("--dim", type=int, default=64, help="head dim D")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--calls", type=int, default=200, help="calls per round, back to back")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--profile-calls", type=int, default=20,
                    help="calls profiled for the GPU kernel time (0: none)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None,
                    help="results folder (default outputs/bench)")  # fmt: skip
    ap.add_argument("--name", default=None, help="default host_overhead_<device>")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "theria.bench overhead: needs a CUDA device (torch.cuda.is_available() is False); "
            "`--device cpu` times theria's torch backend and PyTorch's SDPA on the CPU"
        )
    device = torch.device(args.device)
    env = environment(device)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, args.size, args.dim)
    g = torch.Generator(device=device).manual_seed(0)
    x = tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(7))
    t_start = time.time()
    plan = [
        (mode, name, call) for mode in args.modes for name, call in paths(mode, x, device).items()
    ]
    progress = Progress(len(plan), "bench overhead")
    records: list[dict[str, Any]] = []
    for mode, name, (fn, ctx) in plan:
        progress.step(f"{mode} {name}")
        try:
            with ctx():
                m = per_call(fn, device, args.calls, args.rounds, args.warmup, args.profile_calls)
        except Exception as e:  # a path that cannot run this is a result
            m = {"error": f"fails: {type(e).__name__}: {str(e)[:80]}"}
        records.append({"mode": mode, "path": name, **m})
        print(f"  {m}", flush=True)
    refs = ", ".join(f"{m}: {p}" for m, p in REFERENCE.items() if m in args.modes)
    body = "\n\n".join(
        [
            f"## Host overhead per call\n\n(B, H, N, D) = {shape}, {args.dtype}, L = S = N, no "
            f"mask, on {args.device}. Medians over {args.rounds} rounds of {args.calls} calls "
            f"issued back to back (one synchronize per round, after {args.warmup} warm-up "
            "calls). CPU = time.process_time() of the whole process up to the last call's "
            "return (the host overhead); wall includes the final synchronize; GPU = CUDA "
            f"kernel time per call (torch.profiler, {args.profile_calls} calls). `× SDPA`: "
            f"over the mode's PyTorch reference ({refs}).\n\n"
            + markdown_table(HEADERS, table_rows(records)),
            f"Total wall time {time.time() - t_start:.0f} s.",
            f"Reproduce: `{command_line('python -m theria.bench overhead', args, ap)}`",
        ]
    )
    name = args.name or f"host_overhead_{device.type}"
    write_result(name, "Host overhead per attention call", env, body, args.out)


if __name__ == "__main__":
    main()
