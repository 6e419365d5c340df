"""theria's first-order Triton kernels on CUDA: correctness by the 2× rule, then timings.

    python -m theria.bench gpu [--dims 64 128] [--sizes 1024 2048 4096 8192 16384]
                               [--repeats 10] [--no-check] [--out DIR] [--name NAME]

Check (on by default): bf16, fp16 and fp32 on odd sizes (L, S not multiples of a tile, L ≠ S,
head dims 40/72/96/128, causal, key-padding / dense boolean / additive masks, GQA). For the
output, the VJP (dQ, dK, dV) and the JVP (two-pass `torch.func.jvp` and the fused
`triton_impl.sdpa_jvp`) the error against a float64 reference (the `reference` backend on the
same rounded inputs, upcast) must be at most 2× the error of PyTorch's same-dtype computation
(the `reference` backend in that dtype) — the rule flash-attention's tests use. The check runs
with THERIA_TRITON_AUTOTUNE=0 (each kernel's first tile config), so that it does not autotune
every odd shape; the timed runs autotune, and their forward output is compared with SDPA flash's.

Timings: B=2, H=16, bf16, self-attention L = S = N, no mask, per head dim D and N:

    fwd       theria forward                     vs SDPA flash forward
    fwd+bwd   theria forward + backward (dO)     vs SDPA flash forward + backward
              (each through `theria.sdpa` + autograd, and the kernels called directly)
    fwd+jvp   theria torch.func.jvp (forward, then the JVP pass given lse), theria fused
              forward+JVP (`sdpa_jvp`, one pass) vs SDPA math under torch.func.jvp and
              jvp-flash-attention 0.14.0's `JVPAttn.fwd_dual` (when installed)

Median wall time over `--repeats` calls (after a warm-up call that also autotunes), TFLOP/s
and the CUDA allocator's peak above the inputs. FLOPs count algorithmic matmuls of
2·B·H·N²·D each (docs/MATH.md §2-§4): forward 2 (QKᵀ, PV), forward + backward 7 (2 + 5),
forward + JVP 6 (QKᵀ, PV, Q̇Kᵀ, QK̇ᵀ, (P∘Ṡ)V, PV̇ — the two-pass path recomputes QKᵀ, a 7th,
not counted), the same count for every path so TFLOP/s compare like for like.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria.bench.common import environment, markdown_table, measure, write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATMULS = {"fwd": 2, "fwd+bwd": 7, "fwd+jvp": 6}  # per 2·B·H·N²·D FLOPs; see the docstring
TARGETS = {"fwd+bwd": 2.4, "fwd+jvp": 2.95}  # ms at N=4096, D=64, bf16 (issue 6, H100)

# (name, dtype, B, Hq, Hkv, L, S, E, mask kind, causal)
CHECK_CASES = [
    ("bf16 causal E=40", "bf16", 2, 3, 3, 97, 97, 40, None, True),
    ("bf16 key-padding L≠S E=72", "bf16", 2, 4, 4, 1025, 513, 72, "padding", False),
    ("bf16 additive E=96", "bf16", 1, 2, 2, 130, 1025, 96, "float", False),
    ("bf16 GQA E=128", "bf16", 1, 4, 2, 257, 300, 128, None, False),
    ("fp16 dense-bool empty rows E=64", "fp16", 1, 3, 3, 97, 300, 64, "dense", False),
    ("fp32 causal L>S E=40", "fp32", 1, 2, 2, 130, 97, 40, None, True),
]


def flops(n_mm: int, B: int, H: int, N: int, D: int) -> float:
    return n_mm * 2.0 * B * H * N * N * D


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
    same = _all_outputs("reference", q, k, v, tangents, do, kw)
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


def _flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def _math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _theria(q, k, v):
    return theria.sdpa(q, k, v, backend="triton")


def _jvpfa() -> Callable | None:
    """jvp-flash-attention's `JVPAttn.fwd_dual` as f(q, k, v, tq, tk, tv) -> (out, tangent)."""
    try:
        import torch.autograd.forward_ad as fwAD
        from jvp_flash_attention.jvp_attention import JVPAttn
    except ImportError as e:
        print(f"jvp-flash-attention not available: {e}")
        return None

    def run(q, k, v, tq, tk, tv):
        with fwAD.dual_level():
            dual = [fwAD.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))]
            out = JVPAttn.fwd_dual(*dual)
            p, t = fwAD.unpack_dual(out)
        return p, t

    return run


def _paths(mode: str) -> dict[str, Callable[..., Any]]:
    """Callables of (q, k, v, tq, tk, tv, do) timing one `mode`."""
    from theria.attention import triton_impl
    from theria.attention.contract import Problem
    from theria.attention.triton_impl import sdpa_jvp

    def fwd_bwd(f):
        def run(q, k, v, tq, tk, tv, do):
            prim = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
            return torch.autograd.grad(f(*prim), prim, do)

        return run

    def func_jvp(f):
        return lambda q, k, v, tq, tk, tv, do: torch.func.jvp(f, (q, k, v), (tq, tk, tv))

    def problem(q):
        return Problem(scale=q.shape[-1] ** -0.5, is_causal=False)

    def kernels_fwd_bwd(q, k, v, tq, tk, tv, do):
        out, lse = triton_impl.forward(q, k, v, None, problem(q))
        return triton_impl.backward(q, k, v, None, problem(q), out, lse, do)

    if mode == "fwd":
        return {
            "theria triton": lambda q, k, v, *_: _theria(q, k, v),
            KERNELS_ONLY: lambda q, k, v, *_: triton_impl.forward(q, k, v, None, problem(q)),
            "SDPA flash": lambda q, k, v, *_: _flash(q, k, v),
        }
    if mode == "fwd+bwd":
        return {
            "theria triton": fwd_bwd(_theria),
            KERNELS_ONLY: kernels_fwd_bwd,
            "SDPA flash": fwd_bwd(_flash),
        }
    paths = {
        "theria triton fused (sdpa_jvp)": lambda q, k, v, tq, tk, tv, do: sdpa_jvp(
            q, k, v, tq, tk, tv
        ),
        "theria triton torch.func.jvp (2 passes)": func_jvp(_theria),
        "SDPA math torch.func.jvp": func_jvp(_math),
    }
    jf = _jvpfa()
    if jf is not None:
        paths["jvp-flash-attention fwd_dual"] = lambda q, k, v, tq, tk, tv, do: jf(
            q, k, v, tq, tk, tv
        )
    return paths


# The kernels called directly on canonical tensors: no theria.sdpa argument checks, no
# autograd.Function (whose Python overhead is exposed at small N, where a call is < 1 ms).
KERNELS_ONLY = "theria kernels only (no autograd)"
PEER = {"fwd": "SDPA flash", "fwd+bwd": "SDPA flash", "fwd+jvp": "jvp-flash-attention fwd_dual"}


def bench(dims: list[int], sizes: list[int], repeats: int, device: torch.device) -> str:
    B, H = 2, 16
    headers = ["D", "N", "mode", "path", "ms", "TFLOP/s", "peak MB", "× peer"]
    rows, summary = [], []
    for D in dims:
        for N in sizes:
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, tq, tk, tv, do = (
                torch.randn(B, H, N, D, generator=g, device=device, dtype=torch.bfloat16)
                for _ in range(7)
            )
            with torch.no_grad():
                diff = (_theria(q, k, v) - _flash(q, k, v)).abs().max().item()
            print(f"D={D} N={N}: max |theria - flash| forward = {diff:.3e}", flush=True)
            summary.append([D, N, f"{diff:.2e}"])
            for mode in MATMULS:
                times: dict[str, float] = {}
                results = []
                for name, fn in _paths(mode).items():
                    args = [x.detach() for x in (q, k, v, tq, tk, tv, do)]
                    try:
                        if mode == "fwd":
                            with torch.no_grad():
                                m = measure(lambda fn=fn, a=args: fn(*a), device, repeats=repeats)
                        else:
                            m = measure(lambda fn=fn, a=args: fn(*a), device, repeats=repeats)
                    except Exception as e:  # a peer that fails is reported, not fatal
                        m = {"error": f"{type(e).__name__}: {str(e)[:80]}"}
                    results.append((name, m))
                    if "ms" in m:
                        times[name] = m["ms"]
                    print(D, N, mode, name, m, flush=True)
                peer = times.get(PEER[mode])
                for name, m in results:
                    if "ms" not in m:
                        what = "OOM" if "oom" in m else m.get("error", "?")
                        rows.append([D, N, mode, name, what, "", "", ""])
                        continue
                    tf = flops(MATMULS[mode], B, H, N, D) / (m["ms"] * 1e-3) / 1e12
                    rel = f"{m['ms'] / peer:.2f}" if peer else ""
                    rows.append([D, N, mode, name, m["ms"], tf, m["peak_mb"], rel])
            del q, k, v, tq, tk, tv, do
            torch.cuda.empty_cache()
    table = markdown_table(headers, rows)
    sanity = markdown_table(["D", "N", "max |Δ| forward vs SDPA flash (bf16)"], summary)
    return table, sanity, rows


def _targets(rows: list) -> str:
    """Targets of issue 6 at N=4096, D=64, bf16."""
    get = {(r[0], r[1], r[2], r[3]): r[4] for r in rows if isinstance(r[4], float)}
    lines = []
    fl = get.get((64, 4096, "fwd+bwd", "SDPA flash"))
    for name in ("theria triton", KERNELS_ONLY):
        fb = get.get((64, 4096, "fwd+bwd", name))
        if fb is not None:
            met = "met" if fb <= TARGETS["fwd+bwd"] else "NOT met"
            rel = f", {fb / fl:.2f}× SDPA flash ({fl:.2f} ms here)" if fl else ""
            lines.append(f"- fwd+bwd, {name}: {fb:.2f} ms{rel}; target ≤ 2.4 ms: {met}")
    jf = get.get((64, 4096, "fwd+jvp", "jvp-flash-attention fwd_dual"))
    for name in ("theria triton fused (sdpa_jvp)", "theria triton torch.func.jvp (2 passes)"):
        t = get.get((64, 4096, "fwd+jvp", name))
        if t is not None:
            met = "met" if t <= TARGETS["fwd+jvp"] else "NOT met"
            rel = f", {t / jf:.2f}× jvp-flash-attention ({jf:.2f} ms here)" if jf else ""
            lines.append(f"- fwd+jvp, {name}: {t:.2f} ms{rel}; target ≤ 2.95 ms: {met}")
    return "\n".join(lines) if lines else "- (N=4096, D=64 not timed)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m theria.bench gpu", description=__doc__)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="directory of the .md result")
    ap.add_argument("--name", default="triton_first_order_h100")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("theria.bench gpu: needs a CUDA device")
    device = torch.device("cuda")
    env = environment(device)
    try:
        from importlib.metadata import version

        import jvp_flash_attention  # noqa: F401

        env["jvp-flash-attention"] = version("jvp-flash-attention")
    except Exception:
        env["jvp-flash-attention"] = "not installed (its rows are absent)"
    parts = []
    ok = True
    if not args.no_check:
        table, ok = check(device)
        parts.append(
            "## Correctness: error vs float64 ≤ 2× PyTorch same-dtype error\n\n"
            f"All passed: {'yes' if ok else 'NO'}\n\n{table}"
        )
        print(parts[-1], flush=True)
    timings, sanity, rows = bench(args.dims, args.sizes, args.repeats, device)
    parts.append(f"## Targets (issue 6; N=4096, D=64, bf16)\n\n{_targets(rows)}")
    parts.append(
        "## Timings (B=2, H=16, bf16, L=S=N, no mask)\n\n"
        "`× peer`: time relative to SDPA flash (fwd, fwd+bwd) or jvp-flash-attention's "
        f"fwd_dual (fwd+jvp). FLOPs: {MATMULS} matmuls of 2·B·H·N²·D.\n\n{timings}"
    )
    parts.append(f"## Sanity of the autotuned forward\n\n{sanity}")
    write_result(args.name, "theria Triton first-order kernels (issue 6)", env,
                 "\n\n".join(parts), args.out)  # fmt: skip
    if not ok:
        raise SystemExit("theria.bench gpu: the correctness check FAILED (see the table)")


if __name__ == "__main__":
    main()
