"""Where the host time of one small theria.sdpa call goes on a CUDA machine: per-piece CPU time
(canonicalize, the plan lookups, allocations, each prepared launch, Triton's launcher) and a
cProfile of forward + backward on the calling thread, next to cuDNN SDPA's whole call.

CUDA only: python experiments/host_profile.py [--profile N]"""

import argparse
import cProfile
import io
import pstats
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria._engine import calling_thread
from theria.attention import api
from theria.attention import function as Fn
from theria.attention import triton_impl as T
from theria.attention.contract import canonicalize
from theria.attention.kernels import launch as Lc


def cpu_us(fn, n=2000, rounds=5):
    """Median over rounds of process CPU time per call (no synchronize inside a round)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best.append((time.process_time() - t0) / n * 1e6)
        torch.cuda.synchronize()
    best.sort()
    return best[len(best) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", type=int, default=2000, help="calls under cProfile")
    args = ap.parse_args()
    dev = torch.device("cuda")
    shape = (1, 1, 16, 64)
    q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    do = torch.randn(shape, device=dev, dtype=torch.bfloat16)
    c = canonicalize(q, k, v, None, 0.0, False, None, False, 256)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    for _ in range(2):  # the first call of a shape autotunes; the second stores its plan
        out, lse = T.forward(qd, kd, vd, None, c.problem)
        T.backward(qd, kd, vd, None, c.problem, out, lse, do)
    key = T._plan_key("fwd", c.problem, qd, kd, vd, None)
    prep = T._PLANS[key][0]
    bkey = T._plan_key("bwd", c.problem, qd, kd, vd, None, out, lse, do)
    assert bkey in T._PLANS, "the backward stored no plan"
    fwd_args = (qd, kd, vd, qd, qd, qd, qd, out, lse, out, lse)
    fwd_slots = tuple(zip(T._FWD_SLOTS, fwd_args, strict=True))
    comp = prep.compiled
    values = list(prep.values)
    for i, x in fwd_slots:
        values[prep.pos[i]] = x
    g = prep.grid
    stream = torch._C._cuda_getCurrentRawStream(0)

    def raw_run():  # (comp.run allocates the scratch of TMA-path kernels: theria's allocator)
        with Lc.scratch_allocator():
            comp.run(g[0], g[1], g[2], stream, comp.function, comp.packed_metadata, None, None,
                     None, *values)  # fmt: skip

    launcher = comp.run  # Triton's CudaLauncher: scratch allocation around its C launch

    def inner_run():  # Triton 3.6's argument order of the C launch (no scratch needed here)
        launcher.launch(g[0], g[1], g[2], stream, comp.function, launcher.launch_cooperative_grid,
                        launcher.launch_pdl, None, None, comp.packed_metadata, None, None, None,
                        *values)  # fmt: skip

    def fwd_bwd():
        o = theria.sdpa(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    def cudnn_fwd_bwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)

    def cudnn_fwd():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qd, kd, vd)

    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}, (B, H, N, D) = "
          f"{shape}, bf16; CPU µs per call (median of 5 rounds of 2000)")  # fmt: skip
    rows = [
        ("torch.empty, bf16 cuda", lambda: torch.empty(shape, dtype=torch.bfloat16, device=dev)),
        ("canonicalize", lambda: canonicalize(q, k, v, None, 0.0, False, None, False, 256)),
        ("torch.cuda.current_device()", torch.cuda.current_device),
        ("current raw stream", lambda: Lc._stream(0)),
        ("Triton launch hooks (knobs)", Lc._hooks),
        ("torch.compiler.is_compiling()", torch.compiler.is_compiling),
        ("layout_key(q)", lambda: Lc.layout_key(qd)),
        ("_plan_key, forward", lambda: T._plan_key("fwd", c.problem, qd, kd, vd, None)),
        ("_PLANS lookup (key built)", lambda: T._PLANS.get(key)),
        ("_nothing_to_record(q, k, v)", lambda: Fn._nothing_to_record(q, k, v, None)),
        ("_triton_usable(q)", lambda: api._triton_usable(q)),
        ("Attention.apply (grad)", lambda: Fn.Attention.apply(q, k, v, None, c.problem, T)),
        ("api.attention (no grad)", lambda: Fn.attention(qd, kd, vd, None, c.problem, T)),
        ("Triton launcher, forward kernel (compiled.run)", raw_run),
        ("Triton's C launch alone, forward kernel (3.6 layout)", inner_run),
        ("prepared forward launch (Prepared.run)", lambda: prep.run(fwd_slots)),
        ("triton_impl.forward (plan hit)", lambda: T.forward(qd, kd, vd, None, c.problem)),
        ("triton_impl.backward (plan hit)",
         lambda: T.backward(qd, kd, vd, None, c.problem, out, lse, do)),
        ("theria.sdpa forward (no grad)", lambda: theria.sdpa(qd, kd, vd)),
        ("theria.sdpa forward (no grad, backend='triton')",
         lambda: theria.sdpa(qd, kd, vd, backend="triton")),
        ("theria.sdpa forward (grad)", lambda: theria.sdpa(q, k, v)),
        ("theria.sdpa fwd+bwd, default engine", fwd_bwd),
        ("theria.sdpa fwd+bwd, calling thread", calling_thread(fwd_bwd)),
        ("SDPA cuDNN forward (no grad)", cudnn_fwd),
        ("SDPA cuDNN fwd+bwd, default engine", cudnn_fwd_bwd),
        ("SDPA cuDNN fwd+bwd, calling thread", calling_thread(cudnn_fwd_bwd)),
    ]  # fmt: skip
    print("| piece | CPU µs/call |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {cpu_us(fn):.1f} |", flush=True)
    if args.profile:
        f = calling_thread(fwd_bwd)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.profile):
            f()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
        print(f"\ncProfile of {args.profile} fwd+bwd calls on the calling thread (tottime):")
        print("\n".join(line[:160] for line in s.getvalue().splitlines()[:60]))


if __name__ == "__main__":
    main()
