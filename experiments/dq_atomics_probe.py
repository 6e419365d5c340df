"""What accumulating dQ by atomics inside a key-block pass would cost (issue 16): the design
question behind fusing the dQ̇ kernel of the HVP (and the first-order dQ kernel) into the
dK/dV pass, as FlashAttention-2's backward does for dQ (Dao 2023, §3.2: thread blocks over key
blocks add their dQ parts with atomic adds).

One program per (batch·head, key block) loads its K tile once and walks every query block:
P = (Q Kᵀ) in bf16, part = P K, an (BLOCK_M, D) fp32 tile of the kind each key block adds to
dQ. Three ways to finish each step, timed on the same loop:

    none    part is summed in registers and stored once per program (no dQ traffic): the
            loop's own cost
    atomic  tl.atomic_add of part into a (B·H·L, D) fp32 dQ through pointers
    tma     the same through a tensor descriptor (`desc.atomic_add`: Hopper's bulk tensor
            reduce), host-side `triton.tools.tensor_descriptor.TensorDescriptor`

atomic − none is what the atomics add to the fused pass; compare it with the separate dQ
kernel's time that fusion would remove (`results/hvp_profile_h200.md`: the HVP's dQ̇ kernel
0.93 ms at D=64 and 2.03 ms at D=128, N=4096; the first-order dQ kernel 0.33 / 0.63 ms).
Every variant's dQ is checked against torch (relative error printed; `none` has no dQ).

    python experiments/dq_atomics_probe.py [--sizes 4096] [--dims 64 128]   (CUDA; bf16)
    TRITON_INTERPRET=1 python experiments/dq_atomics_probe.py --smoke       (CPU, float32)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from theria.bench.common import (
    RESULTS_DIR,
    command_line,
    environment,
    markdown_table,
    measure,
    write_result,
)

VARIANTS = ("none", "atomic", "tma")
# (BLOCK_M, BLOCK_N, num_warps) per head dim: the HVP's dK̇/dV̇ tile first
# (kernels.second_order.CONFIGS), then others a fused kernel might take
TILES = {64: [(64, 128, 8), (64, 64, 4), (32, 64, 4)], 128: [(16, 64, 4), (32, 64, 4), (64, 64, 4)]}


@triton.jit
def _probe(
    Q, K, DQ, SINK, desc, L, S,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARIANT: tl.constexpr,
):  # fmt: skip
    n_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bh = (pid // n_n).to(tl.int64)
    start_n = (pid % n_n) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = tl.load(K + bh * S * D + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < S)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m[:, None] < L
        q = tl.load(Q + bh * L * D + offs_m[:, None] * D + offs_d[None, :], mask=rows)
        p = tl.dot(q, tl.trans(k)).to(k.dtype)  # (M, N)
        part = tl.dot(p, k)  # (M, D), fp32
        if VARIANT == 0:
            acc += part
        elif VARIANT == 1:
            tl.atomic_add(DQ + (bh * L + offs_m[:, None]) * D + offs_d[None, :], part, mask=rows)
        else:
            desc.atomic_add([(bh * L + start_m).to(tl.int32), 0], part)
    if VARIANT == 0:  # one store per program, so the loop is not optimised away
        offs_r = tl.arange(0, BLOCK_M)
        tl.store(SINK + pid.to(tl.int64) * BLOCK_M * D + offs_r[:, None] * D + offs_d[None, :], acc)


def run(variant: str, q, k, tile, dq, sink):
    """One probe launch over q, k (BH, L, D) / (BH, S, D)."""
    bm, bn, warps = tile
    BH, L, D = q.shape
    S = k.shape[1]
    desc = None
    if variant == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc = TensorDescriptor.from_tensor(dq.view(BH * L, D), [bm, D])
    grid = (BH * triton.cdiv(S, bn),)
    _probe[grid](q, k, dq, sink, desc, L, S, D=D, BLOCK_M=bm, BLOCK_N=bn,
                 VARIANT=VARIANTS.index(variant), num_warps=warps)  # fmt: skip


def expected(q: torch.Tensor, k: torch.Tensor, bn: int) -> torch.Tensor:
    """Σ over key blocks of bf16(Q K_bᵀ) K_b, in float32 (what the atomic variants add up)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for s in range(0, k.shape[1], bn):
        kb = k[:, s : s + bn]
        p = (q.float() @ kb.float().transpose(1, 2)).to(q.dtype)
        out += p.float() @ kb.float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny float32 run (the interpreter)")
    ap.add_argument("--out", default=None, help=f"results folder (committed: {RESULTS_DIR})")
    ap.add_argument("--name", default="dq_atomics_probe_cuda")
    args = ap.parse_args()
    smoke = args.smoke
    dev = torch.device("cpu" if smoke else "cuda")
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("dq_atomics_probe.py: needs CUDA (or --smoke under the interpreter)")
    dtype = torch.float32 if smoke else torch.bfloat16
    BH = 2 if smoke else 32  # B=2, H=16
    sizes = [64] if smoke else args.sizes
    t0 = time.time()
    rows = []
    for D in args.dims:
        tiles = [(16, 32, 1)] if smoke else TILES[D]
        for N in sizes:
            g = torch.Generator(dev).manual_seed(N + D)
            q, k = (torch.randn(BH, N, D, generator=g, device=dev) * 0.3 for _ in range(2))
            q, k = q.to(dtype), k.to(dtype)
            for tile in tiles:
                want = expected(q, k, tile[1])
                sink = torch.empty(BH * triton.cdiv(N, tile[1]) * tile[0] * D, device=dev)
                for variant in VARIANTS:
                    dq = torch.zeros(BH, N, D, dtype=torch.float32, device=dev)
                    try:
                        run(variant, q, k, tile, dq, sink)
                        err = "" if variant == "none" else f"{(dq - want).norm() / want.norm():.1e}"
                        if smoke:
                            rows.append([D, N, str(tile), variant, "", err])
                            continue

                        def call(variant=variant, tile=tile, dq=dq, x=(q, k), sink=sink):
                            dq.zero_()
                            run(variant, *x, tile, dq, sink)

                        m = measure(call, dev, repeats=args.repeats, warmup=3)
                        rows.append([D, N, str(tile), variant, m.get("ms", "OOM"), err])
                    except Exception as e:  # a variant this Triton or GPU lacks is a result
                        rows.append([D, N, str(tile), variant, f"fails: {type(e).__name__}", ""])
                    print(rows[-1], flush=True)
    body = "\n\n".join(
        [
            f"{'float32, interpreter smoke run' if smoke else 'bf16 inputs, fp32 dQ'}; B·H = "
            f"{BH}, L = S = N; ms: median of {args.repeats} calls, each zeroing dQ first (a "
            "fill of B·H·L·D floats, in every variant). `none`: no dQ traffic; `atomic`: "
            "pointer atomics; `tma`: tensor-descriptor reduce. rel err: ‖dQ − torch‖ / ‖torch‖.",
            markdown_table(
                ["D", "N", "(BLOCK_M, BLOCK_N, warps)", "variant", "ms", "rel err"], rows
            ),
            f"Total wall time {time.time() - t0:.0f} s.",
            f"Reproduce: `{command_line('python experiments/dq_atomics_probe.py', args, ap)}`",
        ]
    )
    if smoke:
        print(body)
        return
    title = "dQ by atomics inside a key-block pass: what the atomics cost"
    out = None if args.out is None else Path(args.out)
    write_result(args.name, title, environment(dev), body, out)


if __name__ == "__main__":
    main()
