"""One HVP through one attention call on the CPU: theria `torch` and `reference` backends vs
PyTorch's math SDPA.

    python -m theria.bench cpu [--sizes 512 1024 2048] [--repeats 5] [--out DIR]

An HVP here is forward + backward + second-order pass for the scalar
ℓ(Q, K, V) = ‖attention(Q, K, V)‖² (no factor ½: `bench.hvp._loss` says why), along a random
direction (u_Q, u_K, u_V):

    rev_rev   g = ∇ℓ (create_graph=True), then ∇⟨g, u⟩       (what MAML's meta-gradient does)
    fwd_rev   ∇ℓ on dual tensors (primal, u): the tangent of ∇ℓ  (forward-over-reverse,
              theria.autodiff.hvp; torch.func's jvp of grad under vmap)

Shapes (B, H, N, D) = (2, 8, N, 64), float32, self-attention sizes L = S = N.
Peak memory is the peak resident set above the level before the call (sampled).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria import autodiff
from theria.bench.common import (
    Progress,
    command_line,
    environment,
    markdown_table,
    measure,
    write_result,
)


def _math_sdpa(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


PATHS: dict[str, Callable] = {
    "theria torch": lambda q, k, v: theria.sdpa(q, k, v, backend="torch"),
    "theria reference": lambda q, k, v: theria.sdpa(q, k, v, backend="reference"),
    "PyTorch math SDPA": _math_sdpa,
}


def _loss(attn: Callable) -> Callable:
    def loss(q, k, v):
        return attn(q, k, v).pow(2).sum()

    return loss


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench cpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["rev_rev", "fwd_rev"])
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default outputs/bench; the committed tables: experiments/results)",
    )
    ap.add_argument("--name", default="hvp_cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment("cpu")
    rows = []
    summary = {}
    progress = Progress(len(args.sizes) * len(args.modes) * len(PATHS), "bench cpu")
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        shape = (args.batch, args.heads, n, args.dim)
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        u = tuple(torch.randn(shape, generator=g) for _ in range(3))
        for mode in args.modes:
            ref_hv, calls = None, {}
            for name, attn in PATHS.items():
                loss = _loss(attn)
                progress.step(f"N={n} {mode} {name}: check, peak memory, {args.repeats} timings")
                try:
                    hv = autodiff.hvp(loss, (q, k, v), u, mode)
                except Exception as e:  # a path that cannot do this mode is a result
                    rows.append([n, mode, name, "fails", "", "", f"{type(e).__name__}"])
                    continue
                ref_hv = hv if ref_hv is None else ref_hv
                err = max(autodiff.rel_err(a, b) for a, b in zip(hv, ref_hv, strict=True))
                call = functools.partial(autodiff.hvp, loss, (q, k, v), u, mode)
                mem = measure(call, "cpu", repeats=1, warmup=0)
                calls[name] = (call, err, mem["peak_mb"])
            # Time the paths round-robin, so a load that varies over the run (other jobs on
            # the machine) affects every path alike; the median over rounds is reported.
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.repeats):
                for name, (call, _, _) in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1e3)
            for name, (_, err, peak) in calls.items():
                m = {
                    "ms": statistics.median(times[name]),
                    "ms_min": min(times[name]),
                    "peak_mb": peak,
                }
                summary[(n, mode, name)] = m
                rows.append([n, mode, name, m["ms"], m["ms_min"], peak, f"{err:.1e}"])
    ratio_rows = []
    for n in args.sizes:
        for mode in args.modes:
            ours, peer = (
                summary.get((n, mode, "theria torch")),
                summary.get((n, mode, "PyTorch math SDPA")),
            )
            if ours and peer:
                ratio_rows.append(
                    [n, mode, ours["ms"] / peer["ms"], ours["peak_mb"] / peer["peak_mb"]]
                )
    body = (
        f"One HVP (forward + backward + second-order pass) through one attention call, "
        f"B={args.batch}, H={args.heads}, D={args.dim}, float32, L = S = N; median of "
        f"{args.repeats} rounds, the paths timed round-robin; peak = resident memory above the "
        "level before the call, with glibc's mmap threshold pinned so freed memory is returned. "
        "`rel err` is the HVP's relative difference from the first path's.\n\n"
        + markdown_table(["N", "mode", "path", "median ms", "min ms", "peak MB", "rel err"], rows)
        + "\n\nRatios theria torch / PyTorch math SDPA "
        "(targets at N=2048: time <= 1.5, memory <= 0.25):\n\n"
        + markdown_table(["N", "mode", "time ratio", "memory ratio"], ratio_rows)
        + f"\n\nReproduce: `{command_line('python -m theria.bench cpu', args, ap, always=())}`"
    )
    write_result(
        args.name,
        "HVP through one attention call, CPU",
        env,
        body,
        args.out,
    )
