"""Where the device time of one HVP goes: per-kernel CUDA time (torch.profiler) of rev_rev and
fwd_rev through `theria.sdpa(backend="triton")`, next to theria's and cuDNN SDPA's forward +
backward, with each call's wall time (median of repeats) beside the sum of its kernels.

The HVP is that of `python -m theria.bench hvp` (ℓ = ‖O‖², B=2, H=16, L = S = N, bf16).
`--tile kernel:D=BM,BN,W,ST,KM` sets a second-order tile first (as `bench hvp --sweep` would),
e.g. `--tile dkdv:128=16,64,4,3,0`; `--tile-tdo` the same for calls with a dO tangent (fwd_rev,
`second_order.CONFIGS_TDO`).

CUDA only: python experiments/hvp_profile.py [--dims 64 128] [--sizes 4096] [--causal]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from theria import autodiff
from theria.bench.common import (
    RESULTS_DIR,
    command_line,
    device_kernel_times,
    environment,
    markdown_table,
    measure,
    write_result,
)
from theria.bench.hvp import CUDNN, FUSED, PATHS, THERIA, _fused_fwd_bwd, _loss


def kernel_times(fn: Callable[[], object], calls: int) -> dict[str, tuple[float, float]]:
    """`bench.common.device_kernel_times` with long kernel names cut to 60 characters (kernels
    whose names agree that far are summed)."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key, (n, ms) in device_kernel_times(fn, torch.device("cuda"), calls).items():
        name = key if len(key) <= 60 else key[:57] + "..."
        out[name][0] += n
        out[name][1] += ms
    return {k: (v[0], v[1]) for k, v in out.items()}


def parse_tile(text: str) -> tuple[str, int, tuple[int, int, int, int, bool]]:
    """'dkdv:128=16,64,4,3,0' -> ("dkdv", 128, (16, 64, 4, 3, False))."""
    try:
        kernel, rest = text.split(":")
        key, cfg = rest.split("=")
        bm, bn, w, st, km = (int(x) for x in cfg.split(","))
    except ValueError:
        raise SystemExit(
            f"--tile {text!r}: expected kernel:D=BLOCK_M,BLOCK_N,warps,stages,key_major "
            "(e.g. dkdv:128=16,64,4,3,0)"
        ) from None
    if kernel not in ("rowstats", "dq", "dkdv"):
        raise SystemExit(f"--tile {text!r}: kernel {kernel!r} is not rowstats, dq or dkdv")
    return kernel, int(key), (bm, bn, w, st, bool(km))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tile", action="append", default=[], help="kernel:D=BM,BN,W,ST,KM")
    ap.add_argument("--tile-tdo", action="append", default=[], help="the same, fwd_rev's table")
    ap.add_argument("--out", default=None, help=f"results folder (committed: {RESULTS_DIR})")
    ap.add_argument("--name", default="hvp_profile_cuda")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("hvp_profile.py: needs a CUDA device")
    from theria.attention.kernels import second_order as so

    for tdo, texts in ((False, args.tile), (True, args.tile_tdo)):
        for text in texts:
            kernel, key, cfg = parse_tile(text)
            so.set_config(kernel, key, cfg, tdo)
    dev = torch.device("cuda")
    t0 = time.time()
    totals, rows = [], []
    for D in args.dims:
        for N in args.sizes:
            g = torch.Generator(dev).manual_seed(N + D)
            shape = (2, 16, N, D)
            q, k, v, do = (
                torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16) for _ in range(4)
            )
            u = tuple(torch.randn(shape, generator=g, device=dev, dtype=torch.bfloat16)
                      for _ in range(3))  # fmt: skip
            loss = _loss(PATHS[THERIA], is_causal=args.causal)

            def theria_fwd_bwd(q=q, k=k, v=v, do=do):
                qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
                out = PATHS[THERIA](qq, kk, vv, is_causal=args.causal)
                torch.autograd.grad(out, (qq, kk, vv), do)

            cases = {
                f"fwd+bwd {CUDNN}": _fused_fwd_bwd(FUSED[CUDNN], q, k, v, do, args.causal),
                f"fwd+bwd {THERIA}": theria_fwd_bwd,
                "rev_rev": lambda loss=loss, p=(q, k, v), u=u: autodiff.hvp(loss, p, u, "rev_rev"),
                "fwd_rev": lambda loss=loss, p=(q, k, v), u=u: autodiff.hvp(loss, p, u, "fwd_rev"),
            }
            for case, fn in cases.items():
                m = measure(fn, dev, repeats=args.repeats, warmup=2)
                kt = kernel_times(fn, calls=args.repeats)
                dev_ms = sum(t for _, t in kt.values())
                totals.append([D, N, case, m["ms"], dev_ms, m["ms"] - dev_ms])
                for name, (n, ms) in sorted(kt.items(), key=lambda x: -x[1][1]):
                    rows.append([D, N, case, name, f"{n:g}", ms, 100 * ms / dev_ms])
                print(totals[-1], flush=True)
    configs = {name: dict(table) for name, table in so.CONFIGS.items()}
    configs_tdo = {name: dict(table) for name, table in so.CONFIGS_TDO.items()}
    body = "\n\n".join(
        [
            f"B=2, H=16, bf16, causal={'yes' if args.causal else 'no'}; ℓ = ‖O‖² as "
            "`python -m theria.bench hvp`. Wall: median of "
            f"{args.repeats} synchronized calls; device: the sum of the CUDA kernels' time per "
            "call under torch.profiler (CUDA activity only). Wall − device ≈ time the GPU "
            "waited for the host (or for nothing: kernels overlap only across streams).",
            "## Per call\n\n"
            + markdown_table(
                ["D", "N", "case", "wall ms", "device ms", "wall − device ms"], totals
            ),
            "## Per kernel\n\n"
            + markdown_table(
                ["D", "N", "case", "kernel", "launches/call", "device ms", "% of device"], rows
            ),
            f"Second-order tiles (kernels.second_order.CONFIGS): `{configs}`; with a dO "
            f"tangent (CONFIGS_TDO, over CONFIGS): `{configs_tdo}`",
            f"Total wall time {time.time() - t0:.0f} s.",
            f"Reproduce: `{command_line('python experiments/hvp_profile.py', args, ap)}`",
        ]
    )
    env = environment(dev)
    title = "Where the device time of one HVP goes (torch.profiler)"
    write_result(args.name, title, env, body, None if args.out is None else Path(args.out))


if __name__ == "__main__":
    main()
