"""One HVP through one attention call on CUDA: theria's Triton kernels vs PyTorch's math SDPA
(the only PyTorch path that can be differentiated twice) vs theria's `torch` backend.

    python -m theria.bench hvp [--dims 64 128] [--dtypes bf16 fp32] [--sizes 1024 ... 32768]
                               [--modes rev_rev fwd_rev] [--no-check] [--sweep] [--out DIR]

An HVP is forward + backward + second-order pass for ℓ(Q, K, V) = ½‖attention(Q, K, V)‖²
(as `python -m theria.bench cpu`), along a random direction (u_Q, u_K, u_V):

    rev_rev   g = ∇ℓ (create_graph=True), then ∇⟨g, u⟩       (what MAML's meta-gradient does)
    fwd_rev   torch.func.jvp(torch.func.grad(ℓ), primals, u)  (forward-over-reverse)

Shapes (B, H, N, D), self-attention L = S = N, no mask. Also timed, as the yardstick of the
targets: PyTorch's flash SDPA forward + backward (first order only).

FLOPs (docs/MATH.md §5.5, §6.2: algorithmic matmuls, 2·B·H·N²·D each, not the recomputation
of split kernels): rev_rev 27 matmuls (forward 2 + backward 5 + double backward 15 + the
backward again for ℓ's curvature 5), fwd_rev 29 (forward 2 + forward JVP 5 + backward 5 +
backward JVP 17), flash forward + backward 7 (2 + 5).

`--check` (on by default) first checks the Triton HVP in bf16 and fp32 against float64 by the
2× rule: its error must be at most twice that of the `reference` backend in the same dtype (plus
a floor at the dtype's resolution), on odd sizes, with causal, mask and GQA cases.
`--sweep` times the second-order kernels' tile configurations (for `kernels.second_order.CONFIGS`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria import autodiff
from theria.bench.common import command_line, environment, markdown_table, measure, write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MATMULS = {"rev_rev": 27, "fwd_rev": 29, "fwd+bwd": 7}  # per 2·B·H·N²·D FLOPs; see docstring


def flops(n_mm: int, B: int, H: int, N: int, D: int) -> float:
    return n_mm * 2.0 * B * H * N * N * D


def _math_sdpa(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def _theria(backend: str) -> Callable:
    return lambda q, k, v, **kw: theria.sdpa(q, k, v, backend=backend, **kw)


PATHS: dict[str, Callable] = {
    "theria triton": _theria("triton"),
    "SDPA math": _math_sdpa,
    "theria torch": _theria("torch"),
}


def _loss(attn: Callable, **kw) -> Callable:
    def loss(q, k, v):
        return 0.5 * attn(q, k, v, **kw).float().pow(2).sum()

    return loss


def _flash_fwd_bwd(q, k, v, do):
    """PyTorch's fused first-order forward + backward: flash for 16-bit inputs; flash has no
    float32 kernel, so float32 gets the memory-efficient one (the row says which)."""
    backend = (
        SDPBackend.FLASH_ATTENTION if q.element_size() == 2 else SDPBackend.EFFICIENT_ATTENTION
    )

    def run():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(qq, kk, vv)
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
    head = ["case", "mode", "dtype", "triton rel err", "reference rel err", "ratio", "2× rule"]
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
        peer = autodiff.hvp(_loss(_theria("reference"), **kw), x, u, mode)
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
    ],
    "dq": [
        (128, 64, 8, 3, False), (64, 64, 4, 3, False), (128, 64, 4, 3, False),
        (64, 32, 4, 3, False), (128, 32, 4, 3, False),
    ],
    "rowstats": [
        (64, 64, 4, 3, False), (128, 64, 8, 3, False), (128, 64, 4, 3, False),
        (64, 32, 4, 3, False), (128, 128, 8, 3, False),
    ],
}  # fmt: skip


def sweep(device: torch.device, dims: list[int], N: int = 4096) -> str:
    """Time `backward_jvp` (all four tangents) per tile configuration of each kernel, the other
    kernels at their current setting; bf16, B=2, H=16, L = S = N."""
    from theria.attention import triton_impl
    from theria.attention.contract import canonicalize
    from theria.attention.kernels import second_order as so

    rows = []
    for D in dims:
        g = torch.Generator(device).manual_seed(D)
        x = [
            torch.randn(2, 16, N, D, generator=g, device=device, dtype=torch.bfloat16)
            for _ in range(7)
        ]
        c = canonicalize(x[0], x[1], x[2], None, 0.0, False, None, False, 256)
        out, lse = triton_impl.forward(c.q, c.k, c.v, None, c.problem)
        args = (c.q, c.k, c.v, None, c.problem, out, lse, x[3], x[4], x[5], x[6], x[3])
        for kernel, configs in SWEEP.items():
            key = min(d for d in so.CONFIGS[kernel] if d >= max(16, 1 << (D - 1).bit_length()))
            saved = so.CONFIGS[kernel][key]
            best = None
            for cfg in configs:
                so.CONFIGS[kernel][key] = cfg
                so._fitted.clear()
                try:
                    m = measure(lambda a=args: so.backward_jvp(*a), device, repeats=10, warmup=2)
                except Exception as e:  # a configuration that does not compile is a result
                    rows.append([D, kernel, str(cfg), f"fails: {type(e).__name__}"])
                    continue
                if (kernel, key) in so._fitted:  # shrunk at launch: not this configuration
                    rows.append([D, kernel, str(cfg), "does not fit in shared memory"])
                    continue
                rows.append([D, kernel, str(cfg), m.get("ms", "OOM")])
                if "ms" in m and (best is None or m["ms"] < best[0]):
                    best = (m["ms"], cfg)
                print(rows[-1], flush=True)
            so.CONFIGS[kernel][key] = best[1] if best else saved
            so._fitted.clear()
            print(f"D={D} {kernel}: best {so.CONFIGS[kernel][key]}", flush=True)
    return markdown_table(
        ["D", "kernel", "(BLOCK_M, BLOCK_N, warps, stages)", "backward_jvp ms"], rows
    )


# ------------------------------------------------------------------------------ benchmark


def _limit(name: str, dtype: str, D: int, N: int, args: argparse.Namespace) -> str | None:
    """Why a (path, size) is not run, or None. Peers are capped where they would take minutes
    (the torch backend) or are known to run out of memory (math SDPA, tried up to the first
    OOM, which is recorded)."""
    if dtype == "fp32" and name == "theria triton" and args.max_fp32 < N:
        return f"not run (> {args.max_fp32}, --max-fp32)"
    if name == "theria torch" and args.max_torch < N:
        return f"not run (> {args.max_torch})"
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench hvp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--modes", nargs="+", default=["rev_rev", "fwd_rev"])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-torch", type=int, default=8192, help="largest N for the torch backend")
    ap.add_argument("--max-fp32", type=int, default=8192, help="largest fp32 N for triton")
    ap.add_argument("--no-check", action="store_true", help="skip the 2× rule correctness check")
    ap.add_argument("--sweep", action="store_true", help="time tile configurations first")
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default outputs/bench; the committed tables: experiments/results)",
    )
    ap.add_argument("--name", default="triton_hvp_h100")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("python -m theria.bench hvp needs a CUDA device")
    device = torch.device("cuda")
    env = environment(device)
    t_start = time.time()
    sections = []

    if not args.no_check:
        sections.append(
            "## Correctness: the 2× rule against float64\n\nRelative error (‖·‖₂ over Q, K, V "
            "parts, worst part) of the HVP against the `reference` backend in float64; the "
            "`reference` backend in the same dtype is the peer. fp64 rows: the Triton kernels "
            "in float64 against `reference` in float64.\n\n" + check(device, args.dtypes)
        )
    if args.sweep:
        sections.append(
            "## Tile sweep (second-order kernels, bf16, N=4096, B=2, H=16)\n\n"
            + sweep(device, args.dims)
        )

    rows, summary = [], {}
    B, H = args.batch, args.heads

    def report(final: bool) -> None:
        """Write the results file; also after each (D, dtype) block, so a run stopped by a time
        limit leaves what it measured."""
        head = ["D", "dtype", "N", "mode", "path", "median ms", "peak MB", "TFLOP/s", "min ms"]
        table = (
            f"## One HVP through one attention call\n\nB={B}, H={H}, L = S = N, no mask; "
            f"ℓ = ½‖O‖²; median of {args.repeats} repeats (3 for N > 8192) after a warm-up; "
            "peak = CUDA allocator peak above the inputs. TFLOP/s from the algorithmic matmul "
            f"count (rev_rev {MATMULS['rev_rev']}, fwd_rev {MATMULS['fwd_rev']}, flash fwd+bwd "
            f"{MATMULS['fwd+bwd']} matmuls of 2·B·H·N²·D FLOPs; docs/MATH.md §5.5, §6.2). "
            "'theria triton' is `theria.sdpa(backend='triton')` end to end (first-order kernels "
            "of `kernels/first_order.py`, second-order kernels of `kernels/second_order.py`).\n\n"
            + markdown_table(head, rows)
            + "\n\n"
            + _targets(summary)
        )
        tail = f"Total wall time {time.time() - t_start:.0f} s" + ("." if final else " (partial).")
        body = "\n\n".join(
            [
                table,
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

    for D in args.dims:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            oom_at: dict[tuple[str, str], int] = {}
            for N in args.sizes:
                g = torch.Generator(device).manual_seed(N + D)
                shape = (B, H, N, D)
                q, k, v = (
                    torch.randn(shape, generator=g, device=device, dtype=dt) for _ in range(3)
                )
                u = tuple(
                    torch.randn(shape, generator=g, device=device, dtype=dt) for _ in range(3)
                )
                reps = args.repeats if N <= 8192 else 3
                fused = "SDPA flash" if dt.itemsize == 2 else "SDPA efficient"
                try:
                    m = measure(_flash_fwd_bwd(q, k, v, torch.randn_like(q)), device, repeats=reps)
                except RuntimeError as e:  # no fused kernel for this case: recorded
                    m = {"fails": str(e)[:60]}
                fl = flops(MATMULS["fwd+bwd"], B, H, N, D)
                summary[(D, dname, N, "flash")] = m
                cells = [f"fails: {m['fails']}", "", "", ""] if "fails" in m else _cells(m, fl)
                rows.append([D, dname, N, "fwd+bwd", f"{fused} (first order)", *cells])
                for mode in args.modes:
                    fl = flops(MATMULS[mode], B, H, N, D)
                    for name in args.paths:
                        why = _limit(name, dname, D, N, args)
                        if (name, mode) in oom_at:
                            why = f"not run (OOM at N={oom_at[(name, mode)]})"
                        if why:
                            rows.append([D, dname, N, mode, name, why, "", "", ""])
                            continue
                        loss = _loss(PATHS[name])
                        print(f"D={D} {dname} N={N} {mode} {name} ...", flush=True)

                        def run(loss=loss, mode=mode, p=(q, k, v), u=u):
                            return autodiff.hvp(loss, p, u, mode)

                        try:
                            m = measure(run, device, repeats=reps)
                        except Exception as e:  # a path that cannot do this is a result
                            rows.append(
                                [D, dname, N, mode, name, f"fails: {type(e).__name__}", "", "", ""]
                            )
                            print(f"  fails: {e}", flush=True)
                            continue
                        if "oom" in m:
                            oom_at[(name, mode)] = N
                            rows.append([D, dname, N, mode, name, "OOM", "", "", ""])
                            continue
                        summary[(D, dname, N, mode, name)] = m
                        rows.append([D, dname, N, mode, name, *_cells(m, fl)])
                        print(f"  {m['ms']:.2f} ms, {m['peak_mb']:.0f} MB", flush=True)
                del q, k, v, u
                torch.cuda.empty_cache()
            report(final=False)
    report(final=True)


def _cells(m: dict, fl: float) -> list:
    if "oom" in m:
        return ["OOM", "", "", ""]
    return [m["ms"], m["peak_mb"], fl / (m["ms"] * 1e-3) / 1e12, m["ms_min"]]


def _targets(summary: dict) -> str:
    """The issue's targets at B=2, H=16, D=64, bf16: HVP at N=4096 ≤ 4× flash fwd+bwd time,
    peak ≤ 3× flash fwd+bwd peak, N=32768 runs; measured against flash in the same run."""
    if not any(key[:3] == (64, "bf16", 4096) for key in summary):
        return "Targets (D=64, bf16, N=4096): not part of this run."
    lines = ["Targets (D=64, bf16, N=4096; flash forward+backward measured in this run):", ""]
    flash = summary.get((64, "bf16", 4096, "flash"))
    for mode in ("rev_rev", "fwd_rev"):
        ours = summary.get((64, "bf16", 4096, mode, "theria triton"))
        math_ = summary.get((64, "bf16", 4096, mode, "SDPA math"))
        if not (flash and ours and "ms" in flash):
            lines.append(f"- {mode}: not measured")
            continue
        t, mem = ours["ms"] / flash["ms"], ours["peak_mb"] / max(flash["peak_mb"], 1e-9)
        s = (
            f"- {mode}: {ours['ms']:.2f} ms = {t:.2f}× flash fwd+bwd ({flash['ms']:.2f} ms; "
            f"target ≤ 4×), peak {ours['peak_mb']:.0f} MB = {mem:.2f}× flash's "
            f"{flash['peak_mb']:.0f} MB (target ≤ 3×)"
        )
        if math_:
            s += f"; {math_['ms'] / ours['ms']:.1f}× faster than SDPA math ({math_['ms']:.1f} ms)"
        big = summary.get((64, "bf16", 32768, mode, "theria triton"))
        s += f"; N=32768: {big['ms']:.0f} ms" if big else "; N=32768: not run"
        lines.append(s)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
