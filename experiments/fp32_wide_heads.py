"""float32 at head dims 65-128 (issue 16): theria's Triton kernels with the wide-head float32
tiles vs theria's `torch` backend (what `auto` picks there) and SDPA's memory-efficient kernel
(the fused float32 path PyTorch has), per head dim, for fwd+bwd and one HVP (rev_rev).

CUDA only. The float32 dot scheme is chosen at import (THERIA_FP32_WIDE_DOTS, default of
`theria.attention.kernels`), so run once per scheme:

    THERIA_FP32_WIDE_DOTS=tf32x3 python experiments/fp32_wide_heads.py
"""

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria.attention import kernels
from theria.bench.common import environment, markdown_table, measure


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H = 2, 16
    rows = []
    for D in args.dims:
        for N in args.sizes:
            g = torch.Generator(dev).manual_seed(N + D)
            x = [torch.randn(B, H, N, D, generator=g, device=dev, requires_grad=True)
                 for _ in range(3)]  # fmt: skip
            u = [torch.randn(B, H, N, D, generator=g, device=dev) for _ in range(3)]
            do = torch.randn(B, H, N, D, generator=g, device=dev)

            def fwd_bwd(attn, x=x, do=do):
                return lambda: torch.autograd.grad(attn(*x), x, do)

            def hvp(attn, x=x, u=u):
                def run():
                    o = attn(*x)
                    gr = torch.autograd.grad(0.5 * o.square().sum(), x, create_graph=True)
                    dot = sum((a * b).sum() for a, b in zip(gr, u, strict=True))
                    return torch.autograd.grad(dot, x)

                return run

            paths = {
                "theria triton": lambda *t: theria.sdpa(*t, backend="triton"),
                "theria torch": lambda *t: theria.sdpa(*t, backend="torch"),
            }

            def efficient(*t):
                with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                    return F.scaled_dot_product_attention(*t)

            res = {}
            for mode, make in (("fwd+bwd", fwd_bwd), ("rev_rev HVP", hvp)):
                for name, attn in paths.items():
                    res[mode, name] = measure(make(attn), dev, args.repeats, warmup=2)
                if mode == "fwd+bwd":
                    res[mode, "SDPA efficient"] = measure(make(efficient), dev, args.repeats, 2)
            for mode in ("fwd+bwd", "rev_rev HVP"):
                tri = res[mode, "theria triton"].get("ms")
                tor = res[mode, "theria torch"].get("ms")
                eff = res.get((mode, "SDPA efficient"), {}).get("ms")
                rows.append([
                    D, N, mode, f"{tri:.3g}" if tri else "oom", f"{tor:.3g}" if tor else "oom",
                    f"{eff:.3g}" if eff else "", f"{tri / tor:.2f}" if tri and tor else "",
                    f"{tri / eff:.2f}" if tri and eff else "",
                ])  # fmt: skip
            print(rows[-2], rows[-1], flush=True)
    env = environment(dev)
    print("\n".join(f"- {k}: {v}" for k, v in env.items()))
    print(f"- float32 dots at padded heads > 64: {kernels.precision(torch.float32, 128)}")
    print(f"\nB={B}, H={H}, float32, L = S = N, no mask; median of {args.repeats} (ms).\n")
    print(markdown_table(
        ["D", "N", "mode", "theria triton ms", "theria torch ms", "SDPA efficient ms",
         "triton / torch", "triton / efficient"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
