"""Registers, spills and shared memory of each Triton kernel at issue 16's shapes, compiled
offline for Hopper (sm_90a) on a machine without a GPU, and the occupancy they allow.

Each kernel's launch arguments are captured from a real call on CPU tensors (the launch itself
is replaced, nothing runs), compiled with Triton's NVIDIA backend and assembled with its
bundled ptxas (`-v` reports registers and spills). Tiles: the autotuner's choice on the H200
(`results/tile_sweep_h200.md`) for the first-order kernels, `kernels.second_order.CONFIGS` for
the second-order ones. CTAs/SM: min over 64 Ki registers (allocated per warp in units of 256)
and 228 KiB of shared memory per SM on an H100/H200; resident warps/SM = CTAs × warps.

    python experiments/kernel_resources.py [--dims 64 128] [--causal] [--sweep-tiles] [--out DIR]

--sweep-tiles: every second-order tile that `python -m theria.bench hvp --sweep` times, to see
which can keep more warps per SM before spending GPU time on them.

Private internals are patched (the launch functions, the CUDA device check): an experiment,
not a library path."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from theria.attention import triton_impl as T
from theria.attention.contract import canonicalize
from theria.attention.kernels import launch as LM
from theria.attention.kernels import second_order as SO
from theria.bench.common import environment, markdown_table, write_result

# The autotuner's picks on the H200, N=4096, not causal (results/tile_sweep_h200.md):
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim.
FIRST_ORDER = {
    "_attn_fwd": {64: (128, 64, 4, 3), 128: (128, 128, 8, 3)},
    "_attn_bwd_dq": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
    "_attn_bwd_dkdv": {64: (32, 128, 4, 5), 128: (64, 128, 8, 3)},
}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
         torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
         torch.uint8: "u8", torch.int8: "i8"}  # fmt: skip
SMEM_PER_SM, REGS_PER_SM, MAX_WARPS = 228 * 1024, 65536, 64


def capture(dim: int, n: int, causal: bool = False) -> list[tuple[Any, list, dict]]:
    """(kernel, runtime args, constexprs) of every launch of one forward, backward and
    second-order (double-backward form) call at (2, 16, n, dim), bf16."""
    seen: list[tuple[Any, list, dict]] = []

    def record(kernel, grid, args, consts):
        seen.append((kernel, list(args), dict(consts)))

    T.launch, SO.launch = record, record  # nothing is launched
    T._check = lambda *a: None  # CPU tensors stand in for CUDA ones
    T._tma_device = lambda device: False  # no CUDA device to ask; TMA is set per compile
    os.environ["THERIA_TRITON_AUTOTUNE"] = "0"  # the first candidate; the tile is set below
    shape = (2, 16, n, dim)
    q, k, v, do, out, tq, tk, tv = (torch.randn(shape, dtype=torch.bfloat16) for _ in range(8))
    lse = torch.randn(shape[:-1])
    problem = canonicalize(q, k, v, None, 0.0, causal, None, False, 256).problem
    T._forward(q, k, v, None, problem, None)
    T.backward.__wrapped__(q, k, v, None, problem, out, lse, do)
    SO.backward_jvp(q, k, v, None, problem, out, lse, do, tq, tk, tv, None)
    return seen


def compile_sm90(kernel: Any, args: list, consts: dict) -> dict[str, Any]:
    """Compile for sm_90a; registers, spill bytes and shared memory from ptxas -v."""
    fn = LM._base(kernel)
    sig: dict[str, str] = {}
    constants: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    it = iter(args)
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if p.is_constexpr:
            sig[name] = "constexpr"
            constants[(i,)] = consts.get(name, p.default)
            continue
        a = next(it)
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + TYPES[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int) and a == 1:  # Triton specializes 1 to a constant
            sig[name], constants[(i,)] = "constexpr", 1
        elif isinstance(a, int):
            sig[name] = "i32" if abs(a) < 2**31 else "i64"
            if a % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: {type(a).__name__}")
    opts = {"num_warps": consts["num_warps"], "num_stages": consts["num_stages"]}
    compiled = triton.compile(ASTSource(fn, sig, constants, attrs),
                              target=GPUTarget("cuda", 90, 32), options=opts)  # fmt: skip
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    info = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr  # fmt: skip
    os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    smem = compiled.metadata.shared
    warps = opts["num_warps"]
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    ctas = min(REGS_PER_SM // (per_warp * warps), SMEM_PER_SM // max(smem, 1),
               MAX_WARPS // warps)  # fmt: skip
    return {"regs": regs, "spill": int(spill.group(1)) + int(spill.group(2)) if spill else 0,
            "smem_kib": smem / 1024, "ctas": ctas, "warps": warps * ctas}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=Path("outputs/bench"))
    ap.add_argument("--causal", action="store_true", help="the causal kernels")
    ap.add_argument("--name", default=None, help="result file name (default from the flags)")
    ap.add_argument("--sweep-tiles", action="store_true",
                    help="the second-order tiles of `bench hvp --sweep`")  # fmt: skip
    args = ap.parse_args()
    rows = []
    for dim in args.dims:
        for kernel, run_args, consts in capture(dim, args.n, args.causal):
            name = LM._base(kernel).fn.__name__
            for tile_consts in _tiles(name, dim, consts, args.sweep_tiles):
                r = compile_sm90(kernel, run_args, tile_consts)
                tile = tuple(tile_consts[c] for c in ("BLOCK_M", "BLOCK_N", "num_warps",
                                                      "num_stages"))  # fmt: skip
                if "KEY_MAJOR" in tile_consts:
                    tile = (*tile, "key-major" if tile_consts["KEY_MAJOR"] else "query-major")
                rows.append((name, dim, tile, r))
                print(f"{name} D={dim} {tile}: {r}", flush=True)
    head = ["kernel", "D", "tile", "registers/thread", "spill bytes (st+ld)", "shared KiB",
            "CTAs/SM", "warps/SM"]  # fmt: skip
    table = [[name, dim, str(tile), r["regs"], r["spill"], f"{r['smem_kib']:.0f}", r["ctas"],
              r["warps"]] for name, dim, tile, r in rows]  # fmt: skip
    body = (
        f"No GPU: compiled for sm_90a, registers and spills from ptxas -v. B=2, H=16, "
        f"N={args.n}, bf16, {'causal' if args.causal else 'not causal'}. "
        "Tile = (BLOCK_M, BLOCK_N, warps, stages). CTAs/SM from "
        "registers (64 Ki per SM) and shared memory (228 KiB per SM). Script: "
        "`python experiments/kernel_resources.py`.\n\n" + markdown_table(head, table)
    )
    title = "Registers, spills and shared memory per kernel (offline sm_90a compile)"
    default = "kernel_resources_sweep_sm90" if args.sweep_tiles else "kernel_resources_sm90"
    name = args.name or default + ("_causal" if args.causal else "")
    write_result(name, title, environment("cpu"), body, args.out)


def _tiles(name: str, dim: int, consts: dict, sweep: bool) -> list[dict]:
    """The constexprs to compile `name` with: its launch's tile (the H200's autotuned pick for a
    first-order kernel), or with `sweep` every tile the HVP tile sweep times (second order)."""
    if name in FIRST_ORDER:
        if sweep:
            return []
        bm, bn, w, st = FIRST_ORDER[name][dim]
        return [{**consts, "BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}]
    if not sweep:
        return [consts]
    from theria.bench.hvp import SWEEP

    kernel = name.removeprefix("_attn_hvp_")
    out = []
    for bm, bn, w, st, key_major in SWEEP[kernel]:
        tile = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
        if kernel == "dkdv":
            tile["KEY_MAJOR"] = key_major
        out.append({**consts, **tile})
    return out


if __name__ == "__main__":
    main()
