"""Where the autograd device-thread hand-off costs time: per-call fwd+bwd with PyTorch's default
engine (backward on a device worker thread) vs set_multithreading_enabled(False), and the time
spent inside theria's Python backward in each mode (experiments/results/engine_thread_h200.md).
CUDA only: python experiments/engine_thread.py"""

import statistics
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria.attention import function as fn_mod

print("python threads:", [t.name for t in threading.enumerate()])
inside = []
orig = fn_mod.Attention.backward


def timed_backward(ctx, *g):
    t0 = time.perf_counter()
    r = orig(ctx, *g)
    inside.append(time.perf_counter() - t0)
    return r


fn_mod.Attention.backward = staticmethod(timed_backward)


class Twice(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2


def per_call(call, n=60):
    for _ in range(10):
        call()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(ts)


def make_paths(leaves, x):
    return {
        "theria.sdpa triton": lambda: torch.autograd.grad(
            theria.sdpa(*leaves, backend="triton"), leaves, x[3]
        ),
        "SDPA cuDNN": lambda: torch.autograd.grad(
            F.scaled_dot_product_attention(*leaves), leaves, x[3]
        ),
        "x*2 (C++ op)": lambda: torch.autograd.grad(leaves[0] * 2, leaves[0], x[3]),
        "Twice (Python Function)": lambda: torch.autograd.grad(
            Twice.apply(leaves[0]), leaves[0], x[3]
        ),
    }


for N in (16, 1024, 4096):
    x = [torch.randn(2, 16, N, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    leaves = [t.detach().requires_grad_() for t in x[:3]]
    paths = make_paths(leaves, x)
    for name, call in paths.items():
        row = []
        for mt in (True, False):
            with torch.autograd.set_multithreading_enabled(mt):
                inside.clear()
                if "cuDNN" in name:
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        t = per_call(call)
                else:
                    t = per_call(call)
                ins = (
                    f" (inside backward {1e6 * statistics.median(inside):.0f} us)"
                    if inside and "theria" in name
                    else ""
                )
                row.append(f"{'multi' if mt else 'single'} {t:8.1f} us{ins}")
        print(f"N={N:5d} {name:26s} " + " | ".join(row), flush=True)
