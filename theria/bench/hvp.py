"""One HVP through one attention call on CUDA: theria's Triton kernels vs PyTorch's math SDPA
(the only PyTorch path that can be differentiated twice) vs theria's `torch` backend, with
PyTorch's fused first-order kernels (cuDNN, flash, memory-efficient forward + backward)
measured in the same run as the yardstick.

    python -m theria.bench hvp [--dims 64 128] [--dtypes bf16 fp32] [--sizes 1024 ... 32768]
                               [--causal no yes] [--modes rev_rev fwd_rev] [--no-check]
                               [--sweep [--sweep-kernels dkdv dq rowstats]] [--out DIR]
                               [--name NAME]

An HVP is forward + backward + second-order pass for ℓ(Q, K, V) = ‖attention(Q, K, V)‖²
(as `python -m theria.bench cpu`; no factor ½, see `_loss`), along a random direction
(u_Q, u_K, u_V):

    rev_rev   g = ∇ℓ (create_graph=True), then ∇⟨g, u⟩       (what MAML's meta-gradient does)
    fwd_rev   ∇ℓ on dual tensors (primal, u): the tangent of ∇ℓ  (forward-over-reverse,
              theria.autodiff.hvp; torch.func's jvp of grad under vmap)

Shapes (B, H, N, D), self-attention L = S = N, no mask, per causal (`is_causal` passed to every
path). Also timed, per shape: PyTorch's SDPA forward + backward (first order only) with each
fused kernel forced by `sdpa_kernel(SDPBackend.…)`: cuDNN, flash, efficient. A kernel that
cannot run a case (cuDNN and flash have no float32 kernel; not built; not supported on this
GPU) raises, and its row shows the error. `× cuDNN fwd+bwd`: time over SDPA cuDNN's forward +
backward for the same causal, D, dtype and N (empty where cuDNN did not run, e.g. float32).

FLOPs (docs/MATH.md §5.5, §6.2: algorithmic matmuls, 2·B·H·N²·D each, not the recomputation
of split kernels): rev_rev 27 matmuls (forward 2 + backward 5 + double backward 15 + the
backward again for ℓ's curvature 5), fwd_rev 29 (forward 2 + forward JVP 5 + backward 5 +
backward JVP 17), fused forward + backward 7 (2 + 5); halved when causal.

Targets (issue 16), from this run's rows, for D ∈ {64, 128}, 16-bit dtypes (cuDNN has no
float32 kernel), causal and not, at every N ≥ 4096 of the run, 'theria triton':

    rev_rev time  ≤ 4.5× SDPA cuDNN forward + backward (goal 4×)
    fwd_rev time  ≤ rev_rev time
    peak memory   ≤ 3× SDPA flash forward + backward's, per mode (issue 7's memory target)

`--check` (on by default) first checks the Triton HVP in bf16 and fp32 against float64 by the
2× rule: its error must be at most twice that of the same computation in torch ops in the same
dtype (`bench.common.same_dtype_sdpa`), on odd sizes, with causal, mask and GQA cases.
`--sweep` times the second-order kernels' tile configurations in the forms both HVP modes call
them (for `kernels.second_order.CONFIGS` and `CONFIGS_TDO`), keeps each form's fastest, then
benchmarks with them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    ratios,
    same_dtype_sdpa,
    target_cells,
    write_result,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEER_REPEATS = 20  # fewest repeats of a fused fwd+bwd peer (N ≤ 16384)
MATMULS = {"rev_rev": 27, "fwd_rev": 29, "fwd+bwd": 7}  # per 2·B·H·N²·D FLOPs; see docstring


def flops(n_mm: int, B: int, H: int, N: int, D: int, causal: bool = False) -> float:
    """Algorithmic FLOPs of `n_mm` (B, H, N, N)-sized matmuls over D; half of them if causal."""
    return n_mm * 2.0 * B * H * N * N * D * (0.5 if causal else 1.0)


def _math_sdpa(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _theria(backend: str) -> Callable:
    return lambda q, k, v, **kw: theria.sdpa(q, k, v, backend=backend, **kw)


THERIA = "theria triton"
PATHS: dict[str, Callable] = {
    THERIA: _theria("triton"),
    "SDPA math": _math_sdpa,
    "theria torch": _theria("torch"),
}
CUDNN, FLASH, EFFICIENT = "SDPA cuDNN", "SDPA flash", "SDPA efficient"
FUSED = {  # PyTorch's fused first-order kernels, the yardstick (mode "fwd+bwd")
    CUDNN: SDPBackend.CUDNN_ATTENTION,
    FLASH: SDPBackend.FLASH_ATTENTION,
    EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
}


def _loss(attn: Callable, **kw) -> Callable:
    """ℓ(Q, K, V) = ‖attention(Q, K, V)‖², summed in float32. Without the customary factor ½:
    under forward-mode AD a Python number's factor meets tensors that carry tangents, and
    PyTorch runs each such op's ZeroTensor arithmetic through Python meta functions (4 ops
    per HVP here, ~0.1-0.25 ms each on a 2-core CPU host; `theria.autodiff.hvp`'s docstring),
    which fwd_rev's time would include and rev_rev's not: a cost of the loss, not of attention."""

    def loss(q, k, v):
        return attn(q, k, v, **kw).float().pow(2).sum()

    return loss


def _fused_fwd_bwd(backend: SDPBackend, q, k, v, do, is_causal: bool = False) -> Callable:
    """One forward + backward through PyTorch's SDPA restricted to one fused kernel (it raises
    if that kernel cannot run the case)."""

    def run():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=is_causal)
        torch.autograd.grad(out, (qq, kk, vv), do)

    return run


# ------------------------------------------------------------------------------ correctness


CHECKS = {
    # name: (B, Hq, Hkv, L, S, D, kwargs)
    "L=1025 S=1025 D=64": (1, 2, 2, 1025, 1025, 64, {}),
    "L=97 S=333 D=72 causal": (2, 2, 2, 97, 333, 72, {"is_causal": True}),
    "L=301 S=257 D=40 bool mask": (1, 3, 3, 301, 257, 40, {"mask": True}),
    "L=200 S=200 D=128 GQA 4:2 causal": (1, 4, 2, 200, 200, 128, {"is_causal": True}),
}


def check(device: torch.device, dtypes: list[str]) -> str:
    """The 2× rule on odd sizes, both HVP modes; returns a markdown table (and raises nothing:
    a failure is a row saying FAIL)."""
    rows = []
    for name, (B, Hq, Hkv, L, S, D, kw) in CHECKS.items():
        g = torch.Generator(device).manual_seed(L + S)
        x64 = (
            torch.randn(B, Hq, L, D, generator=g, device=device, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=g, device=device, dtype=torch.float64),
            torch.randn(B, Hkv, S, D, generator=g, device=device, dtype=torch.float64),
        )
        u64 = tuple(torch.randn(x.shape, generator=g, device=device, dtype=x.dtype) for x in x64)
        kw = dict(kw)
        if kw.pop("mask", False):
            m = torch.rand(L, S, generator=g, device=device) > 0.3
            m[7] = False  # a fully masked row
            kw["attn_mask"] = m
        if Hq != Hkv:
            kw["enable_gqa"] = True
        for mode in ("rev_rev", "fwd_rev"):
            try:
                rows += [[name, *r] for r in _check_one(kw, x64, u64, mode, dtypes)]
            except Exception as e:  # a failure is a result, recorded in the table
                rows.append(
                    [name, mode, "", f"fails: {type(e).__name__}: {e}"[:160], "", "", "FAIL"]
                )
            print(rows[-1], flush=True)
    rows.append(_kernel_fp64(device))
    head = ["case", "mode", "dtype", "triton rel err", "same-dtype rel err", "ratio", "2× rule"]
    return markdown_table(head, rows)


def _kernel_fp64(device: torch.device) -> list:
    """The second-order kernels alone in float64 against the blockwise spec (all tangents)."""
    from theria.attention import blockwise
    from theria.attention.contract import canonicalize
    from theria.attention.kernels import second_order

    name = "backward_jvp alone, L=77 S=130 D=48, GQA, causal"
    g = torch.Generator(device).manual_seed(0)
    shapes = ((2, 4, 77, 48), (2, 2, 130, 48), (2, 2, 130, 48))
    q, k, v = (torch.randn(s, generator=g, device=device, dtype=torch.float64) for s in shapes)
    c = canonicalize(q, k, v, None, 0.0, True, None, True, 64)
    try:
        out, lse = blockwise.forward(c.q, c.k, c.v, None, c.problem)
        t = [
            torch.randn(x.shape, generator=g, device=device, dtype=x.dtype)
            for x in (out, c.q, c.k, c.v, out)
        ]
        args = (c.q, c.k, c.v, None, c.problem, out, lse, *t)
        got, want = second_order.backward_jvp(*args), blockwise.backward_jvp(*args)
        err = max(autodiff.rel_err(a, b) for a, b in zip(got, want, strict=True))
    except Exception as e:  # recorded as a result
        return [
            name,
            "kernel",
            "fp64",
            f"fails: {type(e).__name__}: {str(e)[:100]}",
            "",
            "",
            "FAIL",
        ]
    return [name, "kernel", "fp64", f"{err:.1e}", "", "", "ok" if err < 1e-9 else "FAIL"]


def _check_one(kw: dict, x64: tuple, u64: tuple, mode: str, dtypes: list[str]) -> list[list]:
    """Rows (mode, dtype, triton err, reference err, ratio, verdict) for one case and mode."""
    want = autodiff.hvp(_loss(_theria("reference"), **kw), x64, u64, mode)
    try:
        got64 = autodiff.hvp(_loss(_theria("triton"), **kw), x64, u64, mode)
        err64 = max(autodiff.rel_err(a, b) for a, b in zip(got64, want, strict=True))
        # float64 kernels against float64 reference: both exact formulas, rounding only.
        rows = [[mode, "fp64", f"{err64:.1e}", "", "", "ok" if err64 < 1e-9 else "FAIL"]]
    except Exception as e:  # recorded, and the low-precision rows still run
        rows = [[mode, "fp64", f"fails: {type(e).__name__}: {str(e)[:100]}", "", "", "FAIL"]]
    for dname in dtypes:
        dt = DTYPES[dname]
        x, u = tuple(t.to(dt) for t in x64), tuple(t.to(dt) for t in u64)
        try:
            got = autodiff.hvp(_loss(_theria("triton"), **kw), x, u, mode)
        except Exception as e:  # recorded; the other dtypes still run
            rows.append([mode, dname, f"fails: {type(e).__name__}: {str(e)[:100]}", "", "", "FAIL"])
            continue
        peer = autodiff.hvp(_loss(same_dtype_sdpa, **kw), x, u, mode)  # the 2× rule's yardstick
        err = max(autodiff.rel_err(a, b) for a, b in zip(got, want, strict=True))
        err_p = max(autodiff.rel_err(a, b) for a, b in zip(peer, want, strict=True))
        verdict = "ok" if err <= 2 * err_p else "FAIL"  # the plain 2× rule, no floor
        rows.append([mode, dname, f"{err:.2e}", f"{err_p:.2e}", f"{err / err_p:.2f}", verdict])
    return rows


# ------------------------------------------------------------------------------ tile sweep


SWEEP = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages, key-major tiles), largest kernel first
    "dkdv": [
        (32, 64, 4, 3, False), (64, 64, 4, 3, True), (32, 64, 4, 3, True), (64, 128, 8, 3, True),
        (32, 128, 4, 3, True), (16, 64, 4, 3, False), (64, 64, 4, 2, True),
        (64, 64, 8, 2, True), (64, 64, 8, 3, True), (32, 64, 4, 2, False), (64, 32, 4, 3, False),
        (32, 32, 4, 3, False), (16, 64, 4, 2, False), (32, 32, 4, 2, False), (16, 32, 4, 3, False),
        # key-major with 8 warps: the 128 keys are the M side of two warpgroups' wgmma (offline
        # sm_90a compiles at head dim 128: 0-80 bytes of spill,
        # experiments/results/kernel_resources_sweep_sm90_t36_d128.md)
        (16, 128, 8, 2, True), (32, 128, 8, 2, True), (16, 128, 8, 3, True), (32, 128, 8, 3, True),
    ],
    "dq": [
        (128, 64, 8, 3, False), (64, 64, 4, 3, False), (128, 64, 4, 3, False),
        (64, 32, 4, 3, False), (128, 32, 4, 3, False), (64, 64, 8, 2, False),
        (64, 32, 4, 2, False), (32, 64, 4, 3, False), (128, 32, 8, 2, False),
        (32, 64, 4, 2, False), (32, 32, 4, 3, False), (128, 64, 8, 2, False),
        (128, 32, 8, 3, False),  # fwd_rev's at head dim 128 (hvp_profile_h200_s12.md)
    ],
    "rowstats": [
        (64, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 64, 4, 3, False),
        (64, 32, 4, 3, False), (128, 128, 8, 3, False), (64, 64, 4, 2, False),
        (32, 64, 4, 3, False), (128, 64, 8, 2, False), (32, 64, 4, 2, False),
        (64, 32, 4, 2, False),
    ],
}  # fmt: skip


def sweep(
    device: torch.device,
    dims: list[int],
    N: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    kernels: list[str] | None = None,
) -> str:
    """Time `backward_jvp` per tile configuration of each kernel, the other kernels at their
    current setting; B=2, H=16, L = S = N (bf16 unless `dtype`). Two forms are timed, as the
    HVP modes call it: rev_rev's double backward (tangents of Q, K, V; the first pass forms Ȯ
    and μ: all three kernels; tiles of `second_order.CONFIGS`) and fwd_rev's (a dO tangent
    too, Ȯ and μ given: no row-statistics kernel; tiles of `CONFIGS_TDO`). Each form keeps its
    fastest tile; where none ran, the entry it had before. `kernels`: those of SWEEP to time
    (default all)."""
    from theria.attention import triton_impl
    from theria.attention.contract import canonicalize
    from theria.attention.kernels import second_order as so

    rows, chosen = [], []
    for D in dims:
        g = torch.Generator(device).manual_seed(D)
        x = [torch.randn(2, 16, N, D, generator=g, device=device, dtype=dtype) for _ in range(7)]
        c = canonicalize(x[0], x[1], x[2], None, 0.0, False, None, False, 256)
        out, lse = triton_impl.forward(c.q, c.k, c.v, None, c.problem)
        tangents = (x[4], x[5], x[6])  # of Q, K, V; x[3] is dO and (fwd_rev) its tangent
        o_dot, mu = triton_impl.forward_jvp(c.q, c.k, c.v, None, c.problem, out, lse, *tangents)
        base = (c.q, c.k, c.v, None, c.problem, out, lse, x[3], *tangents)
        forms = {  # form: (dO tangent given, the call)
            "rev_rev": (False, lambda a=base: so.backward_jvp(*a, None)),
            "fwd_rev": (True, lambda a=base, od=o_dot, m=mu: so.backward_jvp(*a, a[7], od, m)),
        }
        for kernel, configs in SWEEP.items():
            if kernels is not None and kernel not in kernels:
                continue
            key = min(d for d in so.CONFIGS[kernel] if d >= max(16, 1 << (D - 1).bit_length()))
            names = ["rev_rev"] if kernel == "rowstats" else list(forms)  # rowstats: rev only
            saved = {False: so.CONFIGS[kernel][key], True: so.CONFIGS_TDO.get(kernel, {}).get(key)}
            best: dict[str, tuple[float, Any]] = {}
            for cfg in configs:
                times: dict[str, Any] = {"fwd_rev": "(not run)"}
                for form in names:
                    tdo, fn = forms[form]
                    so.set_config(kernel, key, cfg, tdo)  # also drops earlier tiles' plans
                    try:
                        m = measure(fn, device, repeats=10, warmup=2)
                    except Exception as e:  # a configuration that does not compile is a result
                        times[form] = f"fails: {type(e).__name__}"
                        continue
                    if (kernel, key, dtype.itemsize, tdo) in so._fitted:  # shrunk: not this one
                        times[form] = "does not fit in shared memory"
                        continue
                    times[form] = m.get("ms", "OOM")
                    if "ms" in m and (form not in best or m["ms"] < best[form][0]):
                        best[form] = (m["ms"], cfg)
                rows.append([D, kernel, str(cfg), times["rev_rev"], times["fwd_rev"]])
                print(rows[-1], flush=True)
            for form in names:
                tdo = forms[form][0]
                if form in best:
                    pick = best[form][1]
                    so.set_config(kernel, key, pick, tdo)
                elif saved[tdo] is not None:  # no tile ran: the entry it had
                    pick = f"{saved[tdo]} (no tile ran: unchanged)"
                    so.set_config(kernel, key, saved[tdo], tdo)
                else:  # nor had it one: calls with a dO tangent fall back to CONFIGS again
                    pick = "no entry (no tile ran: CONFIGS serves it)"
                    so.CONFIGS_TDO[kernel].pop(key, None)
                    so.set_config(kernel, key, so.CONFIGS[kernel][key])  # drops the plans
                table = "CONFIGS_TDO" if tdo else "CONFIGS"
                chosen.append(f"{table}[{kernel!r}][{key}] = {pick}")
                print(f"D={D} {form} {kernel}: best {chosen[-1]}", flush=True)
    headers = ["D", "kernel", "(BLOCK_M, BLOCK_N, warps, stages, key-major)",
               "rev_rev form ms", "fwd_rev form ms"]  # fmt: skip
    what = (
        "Each cell: one `second_order.backward_jvp` call (all its kernels, median of 10), that "
        "kernel at that tile and the others at their current entry."
    )
    kept = "Kept (fastest of each form): " + ", ".join(chosen)
    return what + "\n\n" + markdown_table(headers, rows) + "\n\n" + kept


# ------------------------------------------------------------------------------ benchmark

# A timing is a record {"causal", "D", "dtype", "N", "mode", "path"} plus {"ms", "ms_min",
# "peak_mb"} when it ran, or {"error"} (the exception, "OOM", why it was not run).
Record = dict[str, Any]
GROUP = ("causal", "D", "dtype", "N")  # the fields that a ratio holds fixed
X_CUDNN = {m: ("fwd+bwd", CUDNN) for m in MATMULS}  # the `× cuDNN fwd+bwd` column

TARGET_DIMS = (64, 128)
HVP_LIMIT, HVP_GOAL = 4.5, 4.0  # rev_rev time over SDPA cuDNN forward + backward
PEAK_LIMIT = 3.0  # HVP peak over SDPA flash forward + backward's


def _limit(name: str, dtype: str, D: int, N: int, args: argparse.Namespace) -> str | None:
    """Why a (path, size) is not run, or None. Peers are capped where they would take minutes
    (the torch backend) or are known to run out of memory (math SDPA, tried up to the first
    OOM, which is recorded)."""
    if dtype == "fp32" and name == THERIA and args.max_fp32 < N:
        return f"not run (> {args.max_fp32}, --max-fp32)"
    if name == "theria torch" and args.max_torch < N:
        return f"not run (> {args.max_torch})"
    return None


def _yes(causal: bool) -> str:
    return "yes" if causal else "no"


def timings_table(records: list[Record], B: int, H: int) -> str:
    """The records as a markdown table with TFLOP/s and `× cuDNN fwd+bwd`."""
    rel = ratios(records, GROUP, X_CUDNN)
    rows = []
    for r, x in zip(records, rel, strict=True):
        head = [_yes(r["causal"]), r["D"], r["dtype"], r["N"], r["mode"], r["path"]]
        if "ms" not in r:
            rows.append([*head, r.get("error", "?"), "", "", "", ""])
            continue
        fl = flops(MATMULS[r["mode"]], B, H, r["N"], r["D"], r["causal"])
        tf = fl / (r["ms"] * 1e-3) / 1e12
        cells = [r["ms"], r["peak_mb"], tf, r["ms_min"], "" if x is None else f"{x:.2f}"]
        rows.append([*head, *cells])
    headers = ["causal", "D", "dtype", "N", "mode", "path", "median ms", "peak MB", "TFLOP/s",
               "min ms", "× cuDNN fwd+bwd"]  # fmt: skip
    return markdown_table(headers, rows)


TARGET_HEADERS = ["target", "causal", "D", "dtype", "N", "ours", "reference", "ratio", "limit",
                  "ratio − limit", "verdict"]  # fmt: skip


def targets(records: list[Record]) -> tuple[list[list[Any]], str]:
    """Issue 16's HVP targets on `records` (see the module docstring), for the modes that
    'theria triton' was asked to run: rows of TARGET_HEADERS (times in ms, peaks in MB) and a
    one-line summary (counts of met / NOT met / not measured)."""
    by = {(*(r[g] for g in GROUP), r["mode"], r["path"]): r for r in records}
    cells = sorted(
        {k[:4] for k in by if k[1] in TARGET_DIMS and k[2] in ("bf16", "fp16") and k[3] >= 4096}
    )
    rows: list[list[Any]] = []
    for cell in cells:
        ours = {m: by.get((*cell, m, THERIA)) for m in ("rev_rev", "fwd_rev")}
        ran = {m for m in ours if (*cell, m, THERIA) in by}
        head = [_yes(cell[0]), *cell[1:]]
        cudnn, flash = by.get((*cell, "fwd+bwd", CUDNN)), by.get((*cell, "fwd+bwd", FLASH))
        if "rev_rev" in ran:
            what = "rev_rev ms / SDPA cuDNN fwd+bwd ms"
            rows.append([what, *head, *target_cells(ours["rev_rev"], cudnn, HVP_LIMIT, HVP_GOAL)])
        if ran == {"rev_rev", "fwd_rev"}:
            what = "fwd_rev ms / rev_rev ms"
            rows.append([what, *head, *target_cells(ours["fwd_rev"], ours["rev_rev"], 1.0)])
        for mode in sorted(ran, reverse=True):  # rev_rev, then fwd_rev
            what = f"{mode} peak MB / SDPA flash fwd+bwd peak MB"
            cells_ = target_cells(ours[mode], flash, PEAK_LIMIT, field="peak_mb")
            rows.append([what, *head, *cells_])
    verdicts = [r[-1] for r in rows]
    if not rows:
        return rows, (
            "Issue 16 HVP targets: none in this run (they need 'theria triton' at D ∈ {64, 128},"
            " bf16 or fp16, N ≥ 4096)."
        )
    return rows, (
        f"Issue 16 HVP targets in this run: {verdicts.count('met')} met, "
        f"{verdicts.count('NOT met')} NOT met, {verdicts.count('not measured')} not measured "
        f"(of {len(rows)})."
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench hvp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768],
                    help="N to time; `--sizes` alone: none (only check, sweep)")  # fmt: skip
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"],
                    help="is_causal for every path: no, yes or both")  # fmt: skip
    ap.add_argument("--modes", nargs="+", default=["rev_rev", "fwd_rev"],
                    choices=["rev_rev", "fwd_rev"])  # fmt: skip
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-torch", type=int, default=8192, help="largest N for the torch backend")
    ap.add_argument("--max-fp32", type=int, default=8192, help="largest fp32 N for triton")
    ap.add_argument("--no-check", action="store_true", help="skip the 2× rule correctness check")
    ap.add_argument("--sweep", action="store_true", help="time tile configurations first")
    ap.add_argument("--sweep-kernels", nargs="+", default=list(SWEEP), choices=list(SWEEP),
                    help="the second-order kernels --sweep times (default: all)")  # fmt: skip
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default outputs/bench; the committed tables: experiments/results)",
    )
    ap.add_argument("--name", default="triton_hvp_cuda")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(
            "theria.bench hvp: needs a CUDA device (torch.cuda.is_available() is False); the "
            "CPU benchmark is `python -m theria.bench cpu`"
        )
    device = torch.device("cuda")
    env = environment(device)
    t_start = time.time()
    sections = []

    if not args.no_check:
        sections.append(
            "## Correctness: the 2× rule against float64\n\nRelative error (‖·‖₂ over Q, K, V "
            "parts, worst part) of the HVP against the `reference` backend in float64; "
            "the same composition in the same dtype (`same_dtype_sdpa`) is the peer. fp64 rows: "
            "the Triton kernels in float64 against `reference` in float64.\n\n"
            + check(device, args.dtypes)
        )
    if args.sweep:
        sections.append(
            "## Tile sweep (second-order kernels, bf16, N=4096, B=2, H=16)\n\n"
            + sweep(device, args.dims, kernels=args.sweep_kernels)
        )

    records: list[Record] = []
    B, H = args.batch, args.heads

    def report(final: bool) -> None:
        """Write the results file; also after each (causal, D, dtype) block, so a run stopped
        by a time limit leaves what it measured."""
        rows, summary = targets(records)
        table = (
            f"## One HVP through one attention call\n\nB={B}, H={H}, L = S = N, no mask; "
            f"ℓ = ‖O‖²; median of {args.repeats} repeats (3 for N > 8192; the fused "
            f"fwd+bwd peers at least {PEER_REPEATS} up to N = 16384) after a warm-up; "
            "peak = CUDA allocator peak above the inputs. TFLOP/s from the algorithmic matmul "
            f"count (rev_rev {MATMULS['rev_rev']}, fwd_rev {MATMULS['fwd_rev']}, fused fwd+bwd "
            f"{MATMULS['fwd+bwd']} matmuls of 2·B·H·N²·D FLOPs, halved when causal; "
            "docs/MATH.md §5.5, §6.2). 'theria triton' is `theria.sdpa(backend='triton')` end "
            "to end (first-order kernels of `kernels/first_order.py`, second-order kernels of "
            "`kernels/second_order.py`). fwd+bwd rows: PyTorch's fused first-order SDPA "
            "kernels, the yardstick. `× cuDNN fwd+bwd`: time over SDPA cuDNN's forward + "
            "backward at the same causal, D, dtype, N.\n\n" + timings_table(records, B, H)
        )
        goals = (
            "## Targets (issue 16, from this run's rows)\n\nD ∈ {64, 128}, 16-bit, N ≥ 4096, "
            "causal and not, 'theria triton': rev_rev ≤ 4.5× SDPA cuDNN fwd+bwd (goal 4×); "
            "fwd_rev ≤ rev_rev; peak ≤ 3× SDPA flash fwd+bwd's.\n\n"
            f"{summary}\n\n" + markdown_table(TARGET_HEADERS, rows)
        )
        tail = f"Total wall time {time.time() - t_start:.0f} s" + ("." if final else " (partial).")
        timed = [goals, table] if args.sizes else []  # `--sizes` with no values: no timings
        body = "\n\n".join(
            [
                *timed,
                *sections,
                tail,
                f"Reproduce: `{command_line('python -m theria.bench hvp', args, ap)}`",
            ]
        )
        out = None if args.out is None else Path(args.out)
        title = "HVP through one attention call, Triton kernels on CUDA"
        if final:
            write_result(args.name, title, env, body, out)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                write_result(args.name, title, env, body, out)

    causals = list(dict.fromkeys(c == "yes" for c in args.causal))
    progress = Progress(len(causals) * len(args.dims) * len(args.dtypes) * len(args.sizes),
                        "bench hvp")  # fmt: skip
    for causal in causals:
        for D in args.dims:
            for dname in args.dtypes:
                _block(records, causal, D, dname, args, device, progress)
                report(final=False)
    report(final=True)


def _block(
    records: list[Record], causal: bool, D: int, dname: str, args: argparse.Namespace,
    device: torch.device, progress: Progress,
) -> None:  # fmt: skip
    """Time every size of one (causal, D, dtype): the fused first-order peers, then each HVP
    mode of each path; appends to `records`."""
    dt = DTYPES[dname]
    B, H = args.batch, args.heads
    oom_at: dict[tuple[str, str], int] = {}
    for N in args.sizes:
        progress.step(f"causal={_yes(causal)} D={D} {dname} N={N}")
        g = torch.Generator(device).manual_seed(N + D)
        shape = (B, H, N, D)
        q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dt) for _ in range(3))
        u = tuple(torch.randn(shape, generator=g, device=device, dtype=dt) for _ in range(3))
        do = torch.randn(shape, generator=g, device=device, dtype=dt)
        reps = args.repeats if N <= 8192 else 3
        # the fused peers are the ratios' denominators and cost 1/5 of an HVP or less: more
        # repeats steady their medians (5 left cuDNN's at 1.37 ms over a 1.20 ms minimum once)
        peer_reps = max(reps, PEER_REPEATS) if N <= 16384 else reps
        key = {"causal": causal, "D": D, "dtype": dname, "N": N}
        for name, backend in FUSED.items():
            try:
                fused = _fused_fwd_bwd(backend, q, k, v, do, causal)
                m = measure(fused, device, repeats=peer_reps)
            except Exception as e:  # a kernel that cannot run this case: recorded
                m = {"error": f"fails: {type(e).__name__}: {str(e)[:60]}"}
            records.append({**key, "mode": "fwd+bwd", "path": name, **_ok(m)})
            print(f"D={D} {dname} N={N} causal={causal} fwd+bwd {name}: {m}", flush=True)
        for mode in args.modes:
            for name in args.paths:
                rec = {**key, "mode": mode, "path": name}
                why = _limit(name, dname, D, N, args)
                if (name, mode) in oom_at:
                    why = f"not run (OOM at N={oom_at[(name, mode)]})"
                if why:
                    records.append({**rec, "error": why})
                    continue
                loss = _loss(PATHS[name], is_causal=causal)
                print(f"D={D} {dname} N={N} causal={causal} {mode} {name} ...", flush=True)

                def run(loss=loss, mode=mode, p=(q, k, v), u=u):
                    return autodiff.hvp(loss, p, u, mode)

                try:
                    m = measure(run, device, repeats=reps)
                except Exception as e:  # a path that cannot do this is a result
                    records.append({**rec, "error": f"fails: {type(e).__name__}"})
                    print(f"  fails: {e}", flush=True)
                    continue
                if "oom" in m:
                    oom_at[(name, mode)] = N
                records.append({**rec, **_ok(m)})
                if "ms" in m:
                    print(f"  {m['ms']:.2f} ms, {m['peak_mb']:.0f} MB", flush=True)
        del q, k, v, u, do
        torch.cuda.empty_cache()


def _ok(m: dict[str, Any]) -> dict[str, Any]:
    """`measure`'s result as record fields: an out-of-memory result becomes {"error": "OOM"}."""
    return {"error": "OOM"} if "oom" in m else m


if __name__ == "__main__":
    main()
