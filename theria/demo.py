"""`make demo` (python -m theria.demo): what theria is for, in about two minutes on a CPU.

1. The operator (~10 s): which derivatives PyTorch's default SDPA, PyTorch's math SDPA and
   theria.sdpa support on this machine (theria.boundary.probe, float64), and one Hessian-vector
   product through theria.sdpa checked against finite differences (theria.autodiff.check_hvp).
2. Meta-learning (~1 min): a short MAML run of a small causal transformer whose attention is
   theria.sdpa (conf/experiment/demo.yaml), meta-trained, then evaluated on meta-test tasks;
   it prints where its TensorBoard logs and results are.

Overrides for part 2 may follow on the command line: python -m theria.demo steps=80
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria import autodiff

MARKS = {"works": "yes", "explicit failure": "raises", "silent": "SILENTLY WRONG",
         "unsupported": "n/a", "unavailable": "unavailable"}  # fmt: skip


def _math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v)


def _theria_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return theria.sdpa(q, k, v)


def operator_section() -> None:
    print("== 1. The attention operator: which derivatives work here (CPU, float64) ==")
    try:
        from theria import boundary
    except ImportError as e:  # the probe module is optional for the demo
        print(f"(skipping the derivative table: theria.boundary is not importable: {e})")
    else:
        paths = [("PyTorch SDPA (default)", F.scaled_dot_product_attention),
                 ("PyTorch SDPA (math)", _math_sdpa), ("theria.sdpa", _theria_sdpa)]  # fmt: skip
        results = [boundary.probe(fn, device="cpu", dtype=torch.float64, name=name)
                   for name, fn in paths]  # fmt: skip
        caps = list(boundary.CAPABILITIES)
        width = max(len(n) for n, _ in paths)
        print(" " * width + " | " + " | ".join(caps))
        for (name, _), r in zip(paths, results, strict=True):
            cells = [MARKS.get(r.status(c).value, r.status(c).value).ljust(len(c)) for c in caps]
            print(name.ljust(width) + " | " + " | ".join(cells))
        print("(maml = a second-order MAML meta-gradient through the path; 'raises': PyTorch's "
              "fused kernels have no double backward / forward-mode derivative. The math path "
              "works but holds L×L matrices: experiments/results/exp_attn_paths_*.md compares "
              "memory.)")  # fmt: skip

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g, dtype=torch.float64) for _ in range(3))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return theria.sdpa(q, k, v, is_causal=True).square().sum()

    errs = autodiff.check_hvp(f, (q, k, v), generator=g)
    print("\nOne Hessian-vector product through theria.sdpa (causal, L=33, float64), relative "
          "differences:")  # fmt: skip
    print(f"  reverse-over-reverse vs forward-over-reverse {errs['rev_vs_fwd']:.1e}")
    print(f"  reverse-over-reverse vs finite differences   {errs['rev_vs_fd']:.1e}")
    print(f"  forward-over-reverse vs finite differences   {errs['fwd_vs_fd']:.1e}")
    print(f"  symmetry |uᵀHv − vᵀHu| (relative)             {errs['symmetry']:.1e}")


def training_section(overrides: list[str]) -> None:
    from theria.train import compose_config, train

    print("\n== 2. MAML through theria.sdpa: a short meta-training run (experiment=demo) ==")
    cfg = compose_config(["experiment=demo", *overrides])
    res = train(cfg)
    test = res["test"]
    loss, pre = test["query_loss_post"], test["query_loss_pre"]
    print(f"meta-test ({loss['n']} unseen Markov chains), next-token cross-entropy:")
    print(f"  before adaptation {pre['mean']:.4f} ± {pre['ci95']:.4f}")
    print(f"  after  adaptation {loss['mean']:.4f} ± {loss['ci95']:.4f}   (95% CI)")
    if "query_acc_post" in test:
        acc = test["query_acc_post"]
        print(f"  accuracy after adaptation {acc['mean']:.3f} ± {acc['ci95']:.3f}")
    print(f"results:     {res['run_dir']}/results.json")
    print(f"tensorboard: tensorboard --logdir {res['tensorboard']}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    operator_section()
    t1 = time.perf_counter()
    training_section(argv)
    t2 = time.perf_counter()
    print(f"\n(demo: {t1 - t0:.0f} s operator section, {t2 - t1:.0f} s meta-training)")


if __name__ == "__main__":
    main()
