"""Host time of one forward-over-reverse HVP (theria.autodiff.hvp, mode="fwd_rev") at a size
whose device work is tiny: how much of it is PyTorch's ZeroTensor arithmetic, and what the
backward's dual seed (`autodiff._dual_seed`) and a loss without a Python-number factor take off.

Under forward-mode AD an op that mixes a tensor carrying a tangent with one that carries none
(a Python number in `0.5 * loss`, a plain seed or target) gets a ZeroTensor for the missing
tangent, and PyTorch finds a ZeroTensor op's result shape through its Python meta functions
(torch._refs). The table counts the torch._refs calls of one HVP and times it:

    attention   ℓ = c·‖theria.sdpa(q, k, v)‖², c = ½ (a Python number) or 1, (B, H, N, D) =
                (1, 1, --size, --dim); the torch backend on the CPU, Triton on CUDA
    mlp         Σ (f(x; θ) − y)² / n of a 1-40-40-1 ReLU MLP (the sinusoid task's model and
                theria.tasks.episode's "mse" loss, whose `pred − y` mixes the two)

per seed: "plain" (autograd's default seed, what theria did before) and "dual" (a dual 1 with
a zero tangent), and rev_rev next to them (no forward-mode AD). Cases run round-robin within
each round, so the host's drift spreads over all of them; median over rounds of process CPU
time per call.

    python experiments/fwd_rev_host.py [--device cpu|cuda] [--rounds 7] [--calls 100]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import exp_common as C
import torch
import torch.nn.functional as F

import theria
from theria import autodiff
from theria.bench.common import refs_calls


def _with_seed(seed: str, run: Callable[[], object]) -> Callable[[], object]:
    """`run` with the backward's seed of the fwd_rev dual route made plain (as before the dual
    seed) or left dual."""
    if seed == "dual":
        return run
    real = autodiff._dual_seed

    def plain() -> object:
        autodiff._dual_seed = lambda out: None  # grad_outputs=None: autograd's plain 1
        try:
            return run()
        finally:
            autodiff._dual_seed = real

    return plain


def cases(device: torch.device, size: int, dim: int) -> dict[tuple[str, str, str, str], Callable]:
    """(problem, loss, mode, seed) -> one HVP call."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = "triton" if device.type == "cuda" else "torch"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt)

    qkv = tuple(randn(1, 1, size, dim) for _ in range(3))
    tangents = tuple(randn(1, 1, size, dim) for _ in range(3))

    def half(q, k, v):
        return 0.5 * theria.sdpa(q, k, v, backend=backend).float().pow(2).sum()

    def plain(q, k, v):
        return theria.sdpa(q, k, v, backend=backend).float().pow(2).sum()

    f32 = torch.float32
    mlp = {"w1": randn(40, 1, dt=f32), "b1": randn(40, dt=f32), "w2": randn(40, 40, dt=f32),
           "b2": randn(40, dt=f32), "w3": randn(1, 40, dt=f32), "b3": randn(1, dt=f32)}  # fmt: skip
    mlp_t = {k: randn(*p.shape, dt=f32) for k, p in mlp.items()}
    x, y = randn(10, 1, dt=f32), randn(10, 1, dt=f32)

    def support(p):
        h = F.relu(F.linear(x, p["w1"], p["b1"]))
        h = F.relu(F.linear(h, p["w2"], p["b2"]))
        return (F.linear(h, p["w3"], p["b3"]) - y).square().mean()

    problems = {
        ("attention", "0.5 * ‖O‖²"): (half, qkv, tangents),
        ("attention", "‖O‖²"): (plain, qkv, tangents),
        ("mlp", "mean((pred − y)²)"): (support, mlp, mlp_t),
    }
    out = {}
    for (problem, loss), (fn, primals, tang) in problems.items():

        def run(mode: str, fn=fn, primals=primals, tang=tang) -> Callable[[], object]:
            return lambda: autodiff.hvp(fn, primals, tang, mode)

        out[(problem, loss, "rev_rev", "-")] = run("rev_rev")
        for seed in ("plain", "dual"):
            out[(problem, loss, "fwd_rev", seed)] = _with_seed(seed, run("fwd_rev"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out", type=Path, default=C.RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = cases(device, args.size, args.dim)
    for run in runs.values():  # warm-up: imports, autotuning, launch plans
        for _ in range(5):
            run()
    sync()
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            t0 = time.process_time()
            for _ in range(args.calls):
                run()
            times[key].append((time.process_time() - t0) / args.calls * 1e6)
            sync()
    refs = {key: refs_calls(run) for key, run in runs.items()}
    rows, base = [], {}
    for key in runs:
        med = sorted(times[key])[len(times[key]) // 2]
        if key[2] == "rev_rev":
            base[key[:2]] = med
        rows.append([*key, f"{med:.0f}", f"{med / base[key[:2]]:.2f}", refs[key]])
    where = "Triton kernels, bf16" if device.type == "cuda" else "torch backend, float32"
    text = (
        "# Host time of a forward-over-reverse HVP: the dual seed and the loss's factor\n\n"
        f"- {C.machine()}\n"
        f"- script: `python experiments/fwd_rev_host.py --device {args.device}`\n\n"
        f"Attention: (B, H, N, D) = (1, 1, {args.size}, {args.dim}), {where}; mlp: 1-40-40-1, "
        f"float32, 10 points. Median over {args.rounds} rounds of {args.calls} calls (cases "
        "round-robin within a round) of process CPU time per HVP. `refs calls`: Python calls "
        "into torch._refs in one HVP (PyTorch's ZeroTensor arithmetic). Seed: the backward's "
        "seed on the fwd_rev dual route, plain (autograd's default, before) or dual.\n\n"
        + C.table(
            ["problem", "loss", "mode", "seed", "µs CPU / HVP", "× rev_rev", "refs calls"], rows
        )
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or 'fwd_rev_host_' + args.device}.md"
    path.write_text(text)
    print(text)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
