"""Where the wall time of one forward + backward goes between the host and the GPU: for each call
of each path, a torch.profiler trace (CPU and CUDA activity) split into

    lead   the call's start to its first kernel's start (host work before the GPU has any),
    busy   the sum of its kernels' durations,
    idle   the gaps between consecutive kernels (the GPU waiting, mostly for the host),
    tail   the last kernel's end to the call's end (the synchronization's own latency),

with lead + busy + idle + tail = the call's wall time under the profiler (which slows the host
by a few µs per operator, so lead and idle read high next to `python -m theria.bench gpu`), and
`starved`: how many kernels began within 5 µs of their launch call (an empty GPU queue).

Paths: theria.sdpa(backend="triton") with autograd's default engine and with the backward on
the calling thread, theria's kernels called directly (no autograd), SDPA cuDNN (default engine
and calling thread). B=2, H=16, bf16, L = S = N; gradients of (q, k, v) for a random dO.

CUDA only: python experiments/call_timeline.py [--dims 64 128] [--sizes 4096] [--causal both]
           [--traces DIR]   (the Chrome traces, one per case, for chrome://tracing / Perfetto)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria._engine import calling_thread
from theria.bench.common import (
    RESULTS_DIR,
    command_line,
    environment,
    markdown_table,
    write_result,
)

MARK = "timeline_call"


def _paths(causal: bool) -> dict[str, Callable[..., object]]:
    from theria.attention import triton_impl
    from theria.attention.contract import Problem

    def autograd_path(f: Callable[..., torch.Tensor]) -> Callable[..., object]:
        def run(q, k, v, do):
            prim = tuple(x.detach().requires_grad_() for x in (q, k, v))
            return torch.autograd.grad(f(*prim), prim, do)

        return run

    def th(q, k, v):
        return theria.sdpa(q, k, v, is_causal=causal, backend="triton")

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def kernels(q, k, v, do):
        p = Problem(scale=q.shape[-1] ** -0.5, is_causal=causal)
        out, lse = triton_impl.forward(q, k, v, None, p)
        return triton_impl.backward(q, k, v, None, p, out, lse, do)

    return {
        "theria.sdpa, default engine": autograd_path(th),
        "theria.sdpa, calling thread": calling_thread(autograd_path(th)),
        "theria kernels only": kernels,
        "SDPA cuDNN, default engine": autograd_path(cudnn),
        "SDPA cuDNN, calling thread": calling_thread(autograd_path(cudnn)),
    }


def split_calls(trace: dict) -> list[dict[str, float]]:
    """Per marked call of a Chrome trace: lead, busy, idle, tail, wall (µs), kernels, starved."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    calls = sorted((e for e in events if e.get("name") == MARK and e.get("cat") ==
                    "user_annotation"), key=lambda e: e["ts"])  # fmt: skip
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e["ts"])  # fmt: skip
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver")}  # fmt: skip
    out = []
    for c in calls:
        t0, t1 = c["ts"], c["ts"] + c["dur"]
        ks = [k for k in kernels if t0 <= k["ts"] < t1]
        if not ks:
            continue
        busy = sum(k["dur"] for k in ks)
        idle = sum(max(0.0, b["ts"] - (a["ts"] + a["dur"])) for a, b in itertools.pairwise(ks))
        starved = 0
        for k in ks:
            launch = launches.get(k["args"].get("correlation"))
            if launch is not None and k["ts"] - (launch["ts"] + launch["dur"]) < 5.0:
                starved += 1
        out.append({
            "lead": ks[0]["ts"] - t0, "busy": busy, "idle": idle,
            "tail": t1 - (ks[-1]["ts"] + ks[-1]["dur"]), "wall": c["dur"],
            "kernels": len(ks), "starved": starved,
        })  # fmt: skip
    return out


def profile_case(fn: Callable[[], object], calls: int, trace_path: Path) -> list[dict[str, float]]:
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            with record_function(MARK):
                fn()
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace_path))
    return split_calls(json.loads(trace_path.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--traces", default=None, help="folder for the Chrome traces (kept)")
    ap.add_argument("--out", default=None, help=f"results folder (committed: {RESULTS_DIR})")
    ap.add_argument("--name", default="call_timeline_cuda")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("call_timeline.py: needs a CUDA device")
    dev = torch.device("cuda")
    trace_dir = Path(args.traces or tempfile.mkdtemp(prefix="theria_traces_"))
    trace_dir.mkdir(parents=True, exist_ok=True)
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    rows = []
    for causal in causals:
        for D in args.dims:
            for N in args.sizes:
                g = torch.Generator(dev).manual_seed(N + D)
                inputs = [torch.randn(2, 16, N, D, generator=g, device=dev, dtype=torch.bfloat16)
                          for _ in range(4)]  # fmt: skip
                for name, path in _paths(causal).items():
                    tag = f"{'causal' if causal else 'full'}_D{D}_N{N}_{name.split(',')[0]}"
                    tag += "_ct" if "calling" in name else ""
                    tag = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in tag)
                    per = profile_case(lambda p=path, x=inputs: p(*x), args.calls,
                                       trace_dir / f"{tag}.json")  # fmt: skip
                    med = {key: statistics.median(c[key] for c in per) for key in per[0]}
                    rows.append([
                        "yes" if causal else "no", D, N, name, med["wall"] / 1e3,
                        med["lead"] / 1e3, med["busy"] / 1e3, med["idle"] / 1e3,
                        med["tail"] / 1e3, f"{med['kernels']:g}", f"{med['starved']:g}",
                    ])  # fmt: skip
                    print(rows[-1], flush=True)
                del inputs
    headers = ["causal", "D", "N", "path", "wall ms", "lead ms", "busy ms", "idle ms", "tail ms",
               "kernels", "starved"]  # fmt: skip
    body = "\n\n".join([
        f"B=2, H=16, bf16, L = S = N; one forward + backward per call, synchronized; medians "
        f"over {args.calls} profiled calls (torch.profiler with CPU and CUDA activity, which "
        "slows the host: lead and idle read high against the benchmarks' unprofiled times). "
        "lead: call start to first kernel; busy: kernel time; idle: gaps between kernels; "
        "tail: last kernel's end to the call's end; starved: kernels that began within 5 µs "
        "of their launch (the GPU had nothing queued).",
        markdown_table(headers, rows),
        f"Reproduce: `{command_line('python experiments/call_timeline.py', args, ap)}`",
    ])  # fmt: skip
    title = "Host and GPU time of one forward + backward, call by call (torch.profiler)"
    write_result(args.name, title, environment(dev), body,
                 None if args.out is None else Path(args.out))  # fmt: skip


if __name__ == "__main__":
    main()
