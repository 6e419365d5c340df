"""theria's first-order Triton kernels on CUDA, timed next to PyTorch's fused SDPA kernels
(cuDNN, flash, memory-efficient) in the same run: correctness by the 2× rule, timings, and
issue 16's targets evaluated on this run's rows.

    python -m theria.bench gpu [--dims 64 128] [--sizes 256 1024 4096 16384] [--causal no yes]
                               [--modes fwd fwd+bwd fwd+jvp] [--repeats 10] [--no-check]
                               [--out DIR] [--name NAME]

Check (on by default): bf16, fp16 and fp32 on odd sizes (L, S not multiples of a tile, L ≠ S,
head dims 40/72/96/128, causal, key-padding / dense boolean / additive masks, GQA). For the
output, the VJP (dQ, dK, dV) and the JVP (two-pass `torch.func.jvp` and the fused
`triton_impl.sdpa_jvp`) the error against a float64 reference (the `reference` backend on the
same rounded inputs, upcast) must be at most 2× the error of PyTorch's same-dtype computation
(torch ops in that dtype, `bench.common.same_dtype_sdpa`) — the rule flash-attention's tests
use. The check runs
with THERIA_TRITON_AUTOTUNE=0 (each kernel's first tile config), so that it does not autotune
every odd shape; the timed runs autotune, and their forward output is compared with SDPA flash's.

Timings: B=2, H=16, bf16, self-attention L = S = N, no mask; per causal (`is_causal` passed to
every path), head dim D and N:

    fwd       theria forward through `theria.sdpa(backend="triton")` and with the kernels
              called directly (no checks, no autograd.Function), vs SDPA cuDNN, SDPA flash
              and SDPA efficient forward
    fwd+bwd   the same paths, forward + backward (torch.autograd.grad with a random dO), and
              theria.sdpa and SDPA cuDNN with the backward on the calling thread
              (torch.autograd.set_multithreading_enabled(False); PyTorch's default hands a
              CUDA backward to a worker thread, which costs a Python Function ~0.6 ms a call)
    fwd+jvp   theria torch.func.jvp (forward, then the JVP pass given lse), theria fused
              forward+JVP (`sdpa_jvp`, one pass), SDPA math under torch.func.jvp and
              jvp-flash-attention's `JVPAttn.fwd_dual` (when installed)

Each PyTorch kernel is forced with `sdpa_kernel(SDPBackend.…)`; one that cannot run a case
(not built, not supported on this GPU, dtype or head dim) raises, and its row shows the error
instead of a time. Median wall time over `--repeats` calls (after a warm-up call that also
autotunes), TFLOP/s and the CUDA allocator's peak above the inputs. `× cuDNN`: time over SDPA
cuDNN's for the same causal, D, N and mode (fwd and fwd+bwd; empty for fwd+jvp, which cuDNN
does not compute). `× peer`: time over SDPA flash's (fwd, fwd+bwd) or over jvp-flash-
attention's fwd_dual (fwd+jvp), as in the issue-6 tables. FLOPs count algorithmic matmuls of
2·B·H·N²·D each (docs/MATH.md §2-§4): forward 2 (QKᵀ, PV), forward + backward 7 (2 + 5),
forward + JVP 6 (QKᵀ, PV, Q̇Kᵀ, QK̇ᵀ, (P∘Ṡ)V, PV̇ — the two-pass path recomputes QKᵀ, a 7th,
not counted), halved when causal (flash-attention's benchmark convention), the same count for
every path so TFLOP/s compare like for like.

Targets (issue 16), from this run's rows, for D ∈ {64, 128}, causal and not:

    fwd+bwd through theria.sdpa   ≤ 1.1× SDPA cuDNN's at N ≥ 4096 (goal 1.0×),
                                  ≤ 1.5× at 256 ≤ N ≤ 1024 (sizes in between: no target)
    fwd+bwd, both backwards on    the same limits, theria.sdpa against SDPA cuDNN with autograd's
    the calling thread            backward on the calling thread for both (theria/_engine.py)
    fwd+jvp, fused sdpa_jvp and   ≤ 0.3× jvp-flash-attention's fwd_dual at N ≥ 4096, the sizes
    torch.func.jvp                of the issue-6 figures the target keeps (below them both
                                  calls are host-bound; the timings table shows them); evaluated
                                  only when jvp-flash-attention is installed

Each line gives both times, the ratio, the limit, ratio − limit and met / NOT met ("not
measured" when the reference failed). Issue 6's absolute targets (ms on an H100) are no longer
evaluated; they stay with the H100 table (experiments/results/triton_first_order_h100.md).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria._engine import calling_thread
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
MATMULS = {"fwd": 2, "fwd+bwd": 7, "fwd+jvp": 6}  # per 2·B·H·N²·D FLOPs; see the docstring

# (name, dtype, B, Hq, Hkv, L, S, E, mask kind, causal)
CHECK_CASES = [
    ("bf16 causal E=40", "bf16", 2, 3, 3, 97, 97, 40, None, True),
    ("bf16 key-padding L≠S E=72", "bf16", 2, 4, 4, 1025, 513, 72, "padding", False),
    ("bf16 additive E=96", "bf16", 1, 2, 2, 130, 1025, 96, "float", False),
    ("bf16 GQA E=128", "bf16", 1, 4, 2, 257, 300, 128, None, False),
    ("fp16 dense-bool empty rows E=64", "fp16", 1, 3, 3, 97, 300, 64, "dense", False),
    ("fp32 causal L>S E=40", "fp32", 1, 2, 2, 130, 97, 40, None, True),
    ("fp32 key-padding L≠S E=72", "fp32", 2, 2, 2, 257, 513, 72, "padding", False),
    ("fp32 GQA causal E=128", "fp32", 1, 4, 2, 200, 300, 128, None, True),
]


# --------------------------------------------------------------------------- check


def _case_inputs(case: tuple, device: torch.device) -> tuple:
    _, dt, B, Hq, Hkv, L, S, E, mask_kind, causal = case
    dtype = DTYPES[dt]
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q, k, v = rnd(B, Hq, L, E), rnd(B, Hkv, S, E), rnd(B, Hkv, S, E)
    tangents = (rnd(B, Hq, L, E), rnd(B, Hkv, S, E), rnd(B, Hkv, S, E))
    do = rnd(B, Hq, L, E)
    mask = None
    if mask_kind == "padding":  # (B, 1, 1, S): the last keys of the second batch entry padded
        lengths = torch.tensor([S, S // 2 + 3], device=device)[:B]
        mask = (torch.arange(S, device=device) < lengths[:, None])[:, None, None, :]
    elif mask_kind == "dense":  # (B, H, L, S) with two fully masked rows
        mask = torch.rand(B, Hq, L, S, generator=g, device=device) > 0.3
        mask[:, :, 5] = False
        mask[:, 0, 50] = False
    elif mask_kind == "float":  # additive, with -inf entries
        mask = rnd(B, Hq, L, S)
        mask[torch.rand(B, Hq, L, S, generator=g, device=device) > 0.8] = float("-inf")
    kw = dict(attn_mask=mask, is_causal=causal, enable_gqa=Hq != Hkv)
    return q, k, v, tangents, do, kw


def _all_outputs(backend: str, q, k, v, tangents, do, kw) -> dict[str, torch.Tensor]:
    """out, dq, dk, dv, the JVP tangent (torch.func.jvp) and, for triton, the fused JVP."""
    prim = tuple(x.detach().requires_grad_() for x in (q, k, v))
    if backend == "reference" and kw["attn_mask"] is not None and prim[0].dtype == torch.float64:
        kw = dict(kw, attn_mask=kw["attn_mask"] if kw["attn_mask"].dtype == torch.bool
                  else kw["attn_mask"].double())  # fmt: skip
    if backend == "same dtype":  # the 2× rule's yardstick (bench.common.same_dtype_sdpa)
        f = lambda q, k, v: same_dtype_sdpa(q, k, v, **kw)  # noqa: E731
    else:
        f = lambda q, k, v: theria.sdpa(q, k, v, backend=backend, **kw)  # noqa: E731
    out = f(*prim)
    dq, dk, dv = torch.autograd.grad(out, prim, do.to(out.dtype))
    res = {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}
    tans = tuple(t.to(out.dtype) for t in tangents)
    res["jvp"] = torch.func.jvp(f, tuple(x.detach() for x in prim), tans)[1]
    if backend == "triton":
        from theria.attention.triton_impl import sdpa_jvp

        res["fused jvp"] = sdpa_jvp(*(x.detach() for x in prim), *tans, **kw)[1]
    return res


def _check_case(case: tuple, device: torch.device) -> list[list[Any]]:
    rows = []
    q, k, v, tangents, do, kw = _case_inputs(case, device)
    up = lambda x: x.double()  # noqa: E731
    ref = _all_outputs("reference", up(q), up(k), up(v), tuple(map(up, tangents)), up(do), kw)
    same = _all_outputs("same dtype", q, k, v, tangents, do, kw)
    tri = _all_outputs("triton", q, k, v, tangents, do, kw)
    for name, t in tri.items():
        r = ref["jvp" if name == "fused jvp" else name]
        p = same["jvp" if name == "fused jvp" else name]
        err_t = (t.double() - r).abs().max().item()
        err_p = (p.double() - r).abs().max().item()
        finite = bool(torch.isfinite(t).all())
        passed = finite and err_t <= 2.0 * err_p
        ratio = f"{err_t / max(err_p, 1e-300):.2f}"
        verdict = "ok" if passed else "FAIL"
        rows.append([case[0], name, f"{err_t:.2e}", f"{err_p:.2e}", ratio, verdict])
    return rows


def check(device: torch.device) -> tuple[str, bool]:
    """The 2× rule on every case; returns (markdown table, all passed)."""
    rows: list[list[Any]] = []
    before = os.environ.get("THERIA_TRITON_AUTOTUNE")
    os.environ["THERIA_TRITON_AUTOTUNE"] = "0"
    try:
        for case in CHECK_CASES:
            try:
                rows += _check_case(case, device)
            except Exception as e:  # reported in the table (and fails the check), not fatal
                what = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append([case[0], "error", what, "", "", "FAIL"])
            torch.cuda.empty_cache()
    finally:
        if before is None:
            os.environ.pop("THERIA_TRITON_AUTOTUNE", None)
        else:
            os.environ["THERIA_TRITON_AUTOTUNE"] = before
    ok = all(r[-1] == "ok" for r in rows)
    headers = ["case", "quantity", "err theria", "err torch same dtype", "ratio", "≤ 2×"]
    return markdown_table(headers, rows), ok


# --------------------------------------------------------------------------- timings

# A timing is a record {"causal", "D", "N", "mode", "path"} plus {"ms", "ms_min", "peak_mb"}
# when it ran, or {"error"} (the exception, "OOM") when it did not.
Record = dict[str, Any]
GROUP = ("causal", "D", "N")  # the fields that a ratio holds fixed

THERIA = "theria triton"  # theria.sdpa(backend="triton") + autograd
# The kernels called directly on canonical tensors: no theria.sdpa argument checks, no
# autograd.Function (whose Python overhead is exposed at small N, where a call is < 1 ms).
KERNELS_ONLY = "theria kernels only (no autograd)"
CUDNN, FLASH, EFFICIENT = "SDPA cuDNN", "SDPA flash", "SDPA efficient"
# fwd+bwd with autograd's backward on the calling thread (torch.autograd.
# set_multithreading_enabled(False), as theria's own drivers run it: theria/_engine.py)
THERIA_CT, CUDNN_CT = f"{THERIA}, calling-thread backward", f"{CUDNN}, calling-thread backward"
SDPA_KERNELS = {
    CUDNN: SDPBackend.CUDNN_ATTENTION,
    FLASH: SDPBackend.FLASH_ATTENTION,
    EFFICIENT: SDPBackend.EFFICIENT_ATTENTION,
}
FUSED_JVP = "theria triton fused (sdpa_jvp)"
FUNC_JVP = "theria triton torch.func.jvp (2 passes)"
MATH_JVP = "SDPA math torch.func.jvp"
JVPFA = "jvp-flash-attention fwd_dual"
PEER = {"fwd": FLASH, "fwd+bwd": FLASH, "fwd+jvp": JVPFA}  # the `× peer` column
X_CUDNN = {"fwd": ("fwd", CUDNN), "fwd+bwd": ("fwd+bwd", CUDNN)}  # the `× cuDNN` column

TARGET_DIMS = (64, 128)
JVP_LIMIT = 0.3  # forward+JVP time over jvp-flash-attention's fwd_dual
JVP_MIN_N = 4096  # where the JVP target applies (see the module docstring)


def flops(n_mm: int, B: int, H: int, N: int, D: int, causal: bool = False) -> float:
    """Algorithmic FLOPs of `n_mm` (B, H, N, N)-sized matmuls over D; half of them if causal."""
    return n_mm * 2.0 * B * H * N * N * D * (0.5 if causal else 1.0)


def _sdpa(backend: SDPBackend) -> Callable[..., torch.Tensor]:
    """PyTorch's SDPA restricted to one kernel (it raises if that kernel cannot run)."""

    def run(q, k, v, is_causal: bool = False):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return run


def _math(q, k, v, is_causal: bool = False):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _theria(q, k, v, is_causal: bool = False):
    return theria.sdpa(q, k, v, is_causal=is_causal, backend="triton")


@functools.cache
def _jvpfa() -> Callable | None:
    """jvp-flash-attention's `JVPAttn.fwd_dual` as f(q, k, v, tq, tk, tv, causal) ->
    (out, tangent), or None when it is not installed."""
    try:
        import torch.autograd.forward_ad as fwAD
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError as e:
        print(f"jvp-flash-attention not available: {e}")
        return None

    def run(q, k, v, tq, tk, tv, causal):
        with fwAD.dual_level():
            dual = [fwAD.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))]
            out = JVPAttn.fwd_dual(*dual, causal=causal)
            p, t = fwAD.unpack_dual(out)
        return p, t

    return run


def _paths(mode: str, causal: bool) -> dict[str, Callable[..., Any]]:
    """Callables of (q, k, v, tq, tk, tv, do), each timing one `mode` of one path."""
    from theria.attention import triton_impl
    from theria.attention.contract import Problem
    from theria.attention.triton_impl import sdpa_jvp

    def attn(f):  # f(q, k, v, is_causal) -> out, as a timed callable
        return lambda q, k, v, *_: f(q, k, v, is_causal=causal)

    def fwd_bwd(f):
        def run(q, k, v, tq, tk, tv, do):
            prim = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
            return torch.autograd.grad(f(*prim, is_causal=causal), prim, do)

        return run

    def func_jvp(f):
        g = functools.partial(f, is_causal=causal)
        return lambda q, k, v, tq, tk, tv, do: torch.func.jvp(g, (q, k, v), (tq, tk, tv))

    def problem(q):
        return Problem(scale=q.shape[-1] ** -0.5, is_causal=causal)

    def kernels_fwd(q, k, v, *_):
        return triton_impl.forward(q, k, v, None, problem(q))

    def kernels_fwd_bwd(q, k, v, tq, tk, tv, do):
        out, lse = triton_impl.forward(q, k, v, None, problem(q))
        return triton_impl.backward(q, k, v, None, problem(q), out, lse, do)

    if mode in ("fwd", "fwd+bwd"):
        wrap = attn if mode == "fwd" else fwd_bwd
        paths = {THERIA: wrap(_theria)}
        paths[KERNELS_ONLY] = kernels_fwd if mode == "fwd" else kernels_fwd_bwd
        paths.update({name: wrap(_sdpa(b)) for name, b in SDPA_KERNELS.items()})
        if mode == "fwd+bwd":
            paths[THERIA_CT] = calling_thread(paths[THERIA])
            paths[CUDNN_CT] = calling_thread(paths[CUDNN])
        return paths
    paths = {
        FUSED_JVP: lambda q, k, v, tq, tk, tv, do: sdpa_jvp(q, k, v, tq, tk, tv, is_causal=causal),
        FUNC_JVP: func_jvp(_theria),
        MATH_JVP: func_jvp(_math),
    }
    jf = _jvpfa()
    if jf is not None:
        paths[JVPFA] = lambda q, k, v, tq, tk, tv, do: jf(q, k, v, tq, tk, tv, causal)
    return paths


def time_block(
    D: int, N: int, causal: bool, modes: list[str], repeats: int, device: torch.device,
    B: int = 2, H: int = 16,
) -> tuple[list[Record], str]:  # fmt: skip
    """Every path of every mode at (B, H, N, D), bf16: the records, and the max |Δ| of the
    autotuned forward against SDPA flash's (or why it could not be compared)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, tq, tk, tv, do = (
        torch.randn(B, H, N, D, generator=g, device=device, dtype=torch.bfloat16) for _ in range(7)
    )
    try:
        with torch.no_grad():
            ref = _sdpa(SDPA_KERNELS[FLASH])(q, k, v, is_causal=causal)
            diff = f"{(_theria(q, k, v, is_causal=causal) - ref).abs().max().item():.2e}"
    except Exception as e:  # a sanity figure, not a result: reported
        diff = f"{type(e).__name__}: {str(e)[:80]}"
    print(f"causal={causal} D={D} N={N}: max |theria - flash| forward = {diff}", flush=True)
    records: list[Record] = []
    for mode in modes:
        for name, fn in _paths(mode, causal).items():
            args = [x.detach() for x in (q, k, v, tq, tk, tv, do)]
            grad = torch.no_grad() if mode == "fwd" else contextlib.nullcontext()
            try:
                with grad:
                    m = measure(lambda fn=fn, a=args: fn(*a), device, repeats=repeats)
            except Exception as e:  # a peer that fails is reported, not fatal
                m = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
            if "oom" in m:
                m = {"error": "OOM"}
            records.append({"causal": causal, "D": D, "N": N, "mode": mode, "path": name, **m})
            print(causal, D, N, mode, name, m, flush=True)
    del q, k, v, tq, tk, tv, do
    torch.cuda.empty_cache()
    return records, diff


def _yes(causal: bool) -> str:
    return "yes" if causal else "no"


def timings_table(records: list[Record], B: int = 2, H: int = 16) -> str:
    """The records as a markdown table with TFLOP/s, `× cuDNN` and `× peer`."""
    x_cudnn = ratios(records, GROUP, X_CUDNN)
    x_peer = ratios(records, GROUP, {m: (m, p) for m, p in PEER.items()})
    rows = []
    for r, xc, xp in zip(records, x_cudnn, x_peer, strict=True):
        head = [_yes(r["causal"]), r["D"], r["N"], r["mode"], r["path"]]
        if "ms" not in r:
            rows.append([*head, r.get("error", "?"), "", "", "", ""])
            continue
        fl = flops(MATMULS[r["mode"]], B, H, r["N"], r["D"], r["causal"])
        tf = fl / (r["ms"] * 1e-3) / 1e12
        rel = ["" if x is None else f"{x:.2f}" for x in (xc, xp)]
        rows.append([*head, r["ms"], tf, r["peak_mb"], *rel])
    headers = ["causal", "D", "N", "mode", "path", "ms", "TFLOP/s", "peak MB", "× cuDNN",
               "× peer"]  # fmt: skip
    return markdown_table(headers, rows)


def _band(N: int) -> tuple[float, float | None] | None:
    """Issue 16's (limit, goal) on fwd+bwd time over cuDNN's at size N, or None (no target)."""
    if N >= 4096:
        return 1.1, 1.0
    if 256 <= N <= 1024:
        return 1.5, None
    return None


TARGET_HEADERS = ["target", "causal", "D", "N", "ms", "reference ms", "ratio", "limit",
                  "ratio − limit", "verdict"]  # fmt: skip


def targets(records: list[Record]) -> tuple[list[list[Any]], str]:
    """Issue 16's targets on `records` (see the module docstring): rows of TARGET_HEADERS and
    a one-line summary (counts of met / NOT met / not measured)."""
    by = {(r["causal"], r["D"], r["N"], r["mode"], r["path"]): r for r in records}
    has = {key[:4] for key in by}
    jvpfa = any(r["path"] == JVPFA for r in records)
    rows: list[list[Any]] = []
    for causal, D, N in sorted({k[:3] for k in has if k[1] in TARGET_DIMS}):
        band = _band(N)
        if band is not None and (causal, D, N, "fwd+bwd") in has:
            key = (causal, D, N, "fwd+bwd")
            cells = target_cells(by.get((*key, THERIA)), by.get((*key, CUDNN)), *band)
            rows.append(["fwd+bwd theria.sdpa / SDPA cuDNN", _yes(causal), D, N, *cells])
            if (*key, THERIA_CT) in by:
                cells = target_cells(by.get((*key, THERIA_CT)), by.get((*key, CUDNN_CT)), *band)
                rows.append(["fwd+bwd, both calling-thread backward", _yes(causal), D, N,
                             *cells])  # fmt: skip
        if jvpfa and N >= JVP_MIN_N and (causal, D, N, "fwd+jvp") in has:
            key = (causal, D, N, "fwd+jvp")
            for path, what in ((FUSED_JVP, "fused sdpa_jvp"), (FUNC_JVP, "torch.func.jvp")):
                cells = target_cells(by.get((*key, path)), by.get((*key, JVPFA)), JVP_LIMIT)
                rows.append([f"fwd+jvp {what} / jvp-flash-attention", _yes(causal), D, N,
                             *cells])  # fmt: skip
    verdicts = [r[-1] for r in rows]
    summary = (
        f"Issue 16 targets in this run: {verdicts.count('met')} met, "
        f"{verdicts.count('NOT met')} NOT met, {verdicts.count('not measured')} not measured "
        f"(of {len(rows)})."
    )
    if not rows:
        summary = ("Issue 16 targets: none in this run (they need D ∈ {64, 128} with fwd+bwd at "
                   "256 ≤ N ≤ 1024 or N ≥ 4096, or fwd+jvp).")  # fmt: skip
    if any(k[3] == "fwd+jvp" for k in has) and not jvpfa:
        summary += " jvp-flash-attention is not installed: the forward+JVP targets are not run."
    return rows, summary


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--causal", nargs="+", choices=["no", "yes"], default=["no", "yes"],
                    help="is_causal for every path: no, yes or both")  # fmt: skip
    ap.add_argument("--modes", nargs="+", choices=list(MATMULS), default=list(MATMULS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="directory of the .md result")
    ap.add_argument("--name", default="triton_first_order_cuda")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("theria.bench gpu: needs a CUDA device (torch.cuda.is_available() is "
                         "False); the CPU benchmark is `python -m theria.bench cpu`")  # fmt: skip
    device = torch.device("cuda")
    env = environment(device)
    try:
        from importlib.metadata import version

        import jvp_flash_attention  # noqa: F401

        env["jvp-flash-attention"] = version("jvp-flash-attention")
    except Exception:
        env["jvp-flash-attention"] = "not installed (its rows are absent)"
    t_start = time.time()
    sections = []
    ok = True
    if not args.no_check:
        table, ok = check(device)
        sections.append(
            "## Correctness: error vs float64 ≤ 2× PyTorch same-dtype error\n\n"
            f"All passed: {'yes' if ok else 'NO'}\n\n{table}"
        )
        print(sections[-1], flush=True)

    records: list[Record] = []
    sanity: list[list[Any]] = []

    def report(final: bool) -> None:
        """Write the results file; also after each (causal, D, N) block, so that a run stopped
        by a time limit leaves what it measured."""
        rows, summary = targets(records)
        body = [
            *sections,
            "## Targets (issue 16, from this run's rows)\n\n"
            "fwd+bwd through theria.sdpa ≤ 1.1× SDPA cuDNN at N ≥ 4096 (goal 1.0×), ≤ 1.5× "
            "at N = 256–1024 (with PyTorch's default autograd engine, and with both backwards "
            "on the calling thread); forward+JVP (fused and torch.func.jvp) ≤ 0.3× jvp-flash-"
            f"attention's fwd_dual at N ≥ {JVP_MIN_N}. D ∈ {{64, 128}}, causal and not."
            f"\n\n{summary}\n\n" + markdown_table(TARGET_HEADERS, rows),
            "## Timings (B=2, H=16, bf16, L=S=N, no mask)\n\n"
            "`× cuDNN`: time over SDPA cuDNN's (same causal, D, N, mode; fwd and fwd+bwd). "
            "`× peer`: time over SDPA flash's (fwd, fwd+bwd) or jvp-flash-attention's "
            f"fwd_dual (fwd+jvp). FLOPs: {MATMULS} matmuls of 2·B·H·N²·D, halved when "
            f"causal. Median of {args.repeats} calls after a warm-up.\n\n" + timings_table(records),
            "## Sanity of the autotuned forward\n\n"
            + markdown_table(["causal", "D", "N", "max |Δ| forward vs SDPA flash (bf16)"], sanity),
            f"Total wall time {time.time() - t_start:.0f} s" + ("." if final else " (partial)."),
            f"Reproduce: `{command_line('python -m theria.bench gpu', args, ap, always=())}`",
        ]
        title = "theria Triton first-order kernels vs PyTorch SDPA cuDNN / flash / efficient"
        if final:
            write_result(args.name, title, env, "\n\n".join(body), args.out)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                write_result(args.name, title, env, "\n\n".join(body), args.out)

    causals = list(dict.fromkeys(c == "yes" for c in args.causal))
    blocks = [(c, D, N) for c in causals for D in args.dims for N in args.sizes]
    progress = Progress(len(blocks), "bench gpu")
    for causal, D, N in blocks:
        progress.step(f"causal={_yes(causal)} D={D} N={N}")
        recs, diff = time_block(D, N, causal, args.modes, args.repeats, device)
        records += recs
        sanity.append([_yes(causal), D, N, diff])
        report(final=False)
    report(final=True)
    if not ok:
        raise SystemExit("theria.bench gpu: the correctness check FAILED (see the table)")


if __name__ == "__main__":
    main()
