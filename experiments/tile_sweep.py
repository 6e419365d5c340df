"""Is there a better tile than the autotuner's candidates? Each first-order kernel (forward,
fused forward + JVP, dQ pass, dK/dV pass) timed alone with every tile of its candidate list and
of a wider list, at issue 16's large sizes (B=2, H=16, bf16), next to the autotuner's choice
among the candidates. A tile that beats that choice is a candidate worth adding. `--tma`: with
the streamed operands read by pointer loads (off), by tensor descriptor where the kernel takes
them so (on, the default on Hopper), or both, one row each (`--no-extra`: the candidate lists
only).

CUDA only: python experiments/tile_sweep.py [--sizes 4096] [--dims 64 128] [--tma off|on|both]
                                            [--no-extra] [--out DIR]"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from theria.attention import triton_impl as T
from theria.attention.contract import canonicalize
from theria.attention.kernels import first_order as K
from theria.bench.common import environment, markdown_table, write_result

# (BLOCK_M, BLOCK_N, num_warps, num_stages) beyond each candidate list
EXTRA = {
    "fwd": [(128, 128, 8, 2), (128, 128, 8, 4), (128, 64, 4, 2), (64, 128, 4, 3),
            (128, 32, 4, 3), (64, 64, 4, 4), (128, 64, 8, 4)],
    "fwd+jvp": [(128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 32, 8, 3),
                (64, 32, 4, 3), (128, 64, 4, 2)],
    "dq": [(128, 64, 8, 2), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3),
           (128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 4)],
    "dkdv": [(64, 128, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3),
             (32, 64, 4, 3), (64, 64, 4, 4), (32, 128, 8, 3)],
}  # fmt: skip
LISTS = {"fwd": K.FWD_CONFIGS, "fwd+jvp": K.JVP_CONFIGS, "dq": K.DQ_CONFIGS,
         "dkdv": K.DKDV_CONFIGS}  # fmt: skip
TUNED = {"fwd": [K.attn_fwd_tuned], "fwd+jvp": [K.attn_fwd_dual_tuned, K.attn_fwd_jvp_tuned],
         "dq": [K.attn_bwd_dq_tuned], "dkdv": [K.attn_bwd_dkdv_tuned]}  # fmt: skip


def ms(fn, reps: int, inner: int = 10) -> float:
    """Median CUDA-event time of `fn` over reps (after warm-up), each rep `inner` back-to-back
    calls (so the GPU never waits for the host between launches)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return statistics.median(times)


def reset(kind: str, configs: list) -> None:
    """Make `configs` the candidate list of `kind` (in place: the prune hooks hold the list)."""
    LISTS[kind][:] = configs
    ids = {id(t) for t in TUNED[kind]}
    for t in TUNED[kind]:
        t.cache.clear()
    for key in [key for key in T._BEST if key[0] in ids]:  # other kernels keep their choice
        del T._BEST[key]
    T._PLANS.clear()


def choice(kind: str) -> str:
    """The tile the autotuner chose for `kind` (the last call's)."""
    ids = {id(t) for t in TUNED[kind]}
    picked = [cfg for key, cfg in T._BEST.items() if key[0] in ids]
    if not picked:
        return "?"
    c = picked[-1]
    return str((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages))


def runner(kind: str, q, k, v, do, tq, problem):
    """A function that launches only `kind`'s kernel (through a stored plan)."""
    if kind == "fwd":
        return lambda: T.forward(q, k, v, None, problem)
    if kind == "fwd+jvp":
        return lambda: T.forward_and_jvp(q, k, v, None, problem, tq, tq, tq)
    out, lse = T.forward(q, k, v, None, problem)
    lse_k = T._kernel_stat(lse, q)
    for _ in range(2):  # autotune (or the single tile), then store the plan
        T.backward(q, k, v, None, problem, out, lse, do)
    key = T._plan_key("bwd", problem, q, k, v, None, out, lse_k, do)
    dq_run, dkdv, d_spec, q_spec, k_spec, v_spec, _ = T._PLANS[key]
    delta = torch.empty(d_spec[0], dtype=d_spec[1], device=q.device)
    dq, dk, dv = (torch.empty(s[0], dtype=s[1], device=q.device) for s in (q_spec, k_spec, v_spec))
    dq_slots = tuple(zip(T._DQ_SLOTS, (q, k, v, q, do, lse_k, delta, dq, out), strict=True))
    dkdv_slots = tuple(zip(T._DKDV_SLOTS, (q, k, v, q, do, lse_k, delta, dk, dv), strict=True))
    dq_run.run(dq_slots)  # delta for the dK/dV pass
    if kind == "dq":
        return lambda: dq_run.run(dq_slots)
    return lambda: dkdv.run(dkdv_slots)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--kinds", nargs="+", default=list(EXTRA))
    ap.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tma", choices=["off", "on", "both"], default="off")
    ap.add_argument("--no-extra", action="store_true", help="the candidate lists only")
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    original = {kind: list(LISTS[kind]) for kind in LISTS}
    rows = []
    t0 = time.time()
    tma_of = T._tma
    tma_modes = {"off": [False], "on": [True], "both": [False, True]}[args.tma]
    for kind in args.kinds:
        base = original[kind]
        extra = [] if args.no_extra else [K._configs([c])[0] for c in EXTRA[kind]]
        for D in args.dims:
            for causal, N, tma in ((c == "yes", n, t) for c in args.causal for n in args.sizes
                                   for t in tma_modes):  # fmt: skip
                T._tma = tma_of if tma else (lambda *a: False)
                g = torch.Generator(device=dev).manual_seed(0)
                q, k, v, do, tq = (torch.randn(2, 16, N, D, device=dev, dtype=torch.bfloat16,
                                               generator=g) for _ in range(5))  # fmt: skip
                problem = canonicalize(q, k, v, None, 0.0, causal, None, False, 256).problem
                reset(kind, base)
                auto = ms(runner(kind, q, k, v, do, tq, problem), args.reps)
                chosen = choice(kind)
                results = []
                for cfg in base + extra:
                    reset(kind, [cfg])
                    try:
                        t = ms(runner(kind, q, k, v, do, tq, problem), args.reps)
                    except OutOfResources:
                        t = float("nan")
                    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps,
                            cfg.num_stages)  # fmt: skip
                    results.append((t, tile, cfg in base))
                best = min((r for r in results if r[0] == r[0]), default=None)
                rows.append((kind, D, causal, N, tma, auto, chosen, best))
                line = ", ".join(f"{r[1]}{'' if r[2] else '+'}: {r[0]:.3f}" for r in results)
                print(f"{kind} D={D} causal={causal} N={N} tma={tma}: auto {auto:.3f} ms "
                      f"({chosen}); {line}  [{time.time() - t0:.0f} s]", flush=True)  # fmt: skip
        reset(kind, base)
    T._tma = tma_of
    table = []
    for kind, D, causal, N, tma, auto, chosen, best in rows:
        if best is not None:
            t, tile, inside = best
            mark = "" if inside else "+"
            table.append([kind, D, "yes" if causal else "no", N, "TMA" if tma else "pointers",
                          f"{auto:.3f}", chosen, f"{tile}{mark}", f"{t:.3f}",
                          f"{t / auto:.2f}"])  # fmt: skip
    head = ["kernel", "D", "causal", "N", "loads", "autotuned ms", "its tile", "best tile",
            "best ms", "best / auto"]  # fmt: skip
    body = (
        f"B=2, H=16, bf16; median of {args.reps} CUDA-event timings of 10 back-to-back "
        "launches, per launch. `+` marks a tile outside the candidate list. Script: "
        "`python experiments/tile_sweep.py`.\n\n" + markdown_table(head, table)
    )
    title = "First-order kernel tiles: the autotuner's choice vs every tile, per kernel alone"
    write_result("tile_sweep_cuda", title, environment(dev), body, args.out)


if __name__ == "__main__":
    main()
