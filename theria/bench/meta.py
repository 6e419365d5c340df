"""One meta-step (MAML, iMAML) through a transformer, per attention path.

    python -m theria.bench meta [--device cpu|cuda] [--seq-lens 256 512] [--repeats 3] [--out DIR]

A meta-step is `algo(model, params, tasks)` on a meta-batch of few-shot next-token tasks
(random Markov chains, causal attention): the inner loop on each task's support sequences, the
query loss, and the meta-gradient. MAML differentiates through the inner step (double
backward through every attention call); iMAML solves the proximal inner problem and runs CG
whose matvec is a Hessian-vector product (reverse-over-reverse by default). Tasks are
processed one after another, so peak memory is that of one task's graph.

Paths: `theria` (theria.sdpa backend auto: the Triton kernels for float16/bfloat16 CUDA
inputs, else the blockwise torch Functions), `theria_triton` (backend "triton"), `reference`
(theria's explicit composition), `sdpa_math` (PyTorch's math SDPA), and
`sdpa` (PyTorch's default dispatch: on the CPU its fused kernel has no double backward, so
the step fails; listed to show it fails loudly). `rel err` is the meta-gradient's relative
difference from the `reference` path's (same parameters, same tasks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from theria.algos import IMAML, MAML
from theria.bench.common import environment, markdown_table, measure, write_result
from theria.models import Transformer, TransformerConfig
from theria.tasks import MarkovChainTasks


def _algo(name: str, args: argparse.Namespace):
    if name == "maml":
        return MAML(inner_steps=args.inner_steps, inner_lr=0.1)
    if name == "imaml":
        return IMAML(lam=1.0, inner_steps=args.inner_steps, inner_lr=0.1, cg_iters=args.cg_iters)
    raise SystemExit(f"--algos: unknown algorithm {name!r} (maml, imaml)")


def _track_cpu_memory() -> bool:
    """Makes the resident set follow live CPU tensors, so `measure`'s peak is the step's.

    glibc raises its mmap threshold after large frees and keeps freed chunks in the heap, so
    after a warm-up a step reuses memory without growing the resident set (peaks read ~0).
    A fixed threshold (mallopt M_MMAP_THRESHOLD = 64 KiB, which also turns the dynamic
    adjustment off) maps every large tensor on its own and returns it to the system on free.
    Returns False where glibc is not available (then peaks are lower bounds)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and bool(libc.malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    den = sum((b[k].double() ** 2).sum() for k in b)
    return float((num / den).sqrt())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench meta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256, 768])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=2, help="meta-batch size")
    ap.add_argument("--shots", type=int, default=2, help="support (= query) sequences per task")
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--cg-iters", type=int, default=3)
    ap.add_argument("--algos", nargs="+", default=["maml", "imaml"])
    ap.add_argument("--paths", nargs="+", default=["theria", "reference", "sdpa_math", "sdpa"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: unchanged)")
    ap.add_argument("--out", default=None, help="results folder (default experiments/results)")
    ap.add_argument("--name", default=None, help="result file name (default meta_step_<device>)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    if device.type == "cpu":
        env["cpu memory"] = (
            "glibc mmap threshold fixed at 64 KiB (resident set follows live tensors)"
            if _track_cpu_memory()
            else "glibc mallopt unavailable: peaks are lower bounds"
        )
    rows, summary = [], {}
    for seq_len in args.seq_lens:
        sampler = MarkovChainTasks(
            vocab_size=args.vocab, seq_len=seq_len, k_shot=args.shots, k_query=args.shots
        )
        tasks = sampler.sample("train", args.tasks, torch.Generator().manual_seed(seq_len))
        tasks = tasks.to(device)
        cfg = dict(
            dim=args.dim,
            depth=args.depth,
            heads=args.heads,
            vocab_size=args.vocab,
            causal=True,
            max_len=seq_len,
        )
        for algo_name in args.algos:
            algo = _algo(algo_name, args)
            grads = {}
            for path in sorted(args.paths, key=lambda p: p != "reference"):  # reference first
                torch.manual_seed(0)  # the same initial parameters for every path
                model = Transformer(TransformerConfig(**cfg, attn=path)).to(device, dtype)
                params = algo.init_params(model)
                print(f"L={seq_len} {algo_name} {path} ...", flush=True)
                last = {}

                def step(a=algo, mo=model, p=params, t=tasks, last=last):
                    last["grads"] = a(mo, p, t).grads

                try:
                    m = measure(step, device, args.repeats)
                except RuntimeError as e:  # a path that cannot take the step is a result
                    first = str(e).split(":")[0]
                    rows.append([seq_len, algo_name, path, "fails", "", "", first[:60]])
                    continue
                if "grads" in last:
                    grads[path] = last["grads"]
                ref = grads.get("reference")
                err = None if ref is None or path not in grads else _rel(grads[path], ref)
                if "oom" in m:
                    rows.append([seq_len, algo_name, path, "OOM", "", "", ""])
                    continue
                summary[(seq_len, algo_name, path)] = m
                err_s = "" if err is None else f"{err:.1e}"
                rows.append([seq_len, algo_name, path, m["ms"], m["ms_min"], m["peak_mb"], err_s])
    ratio_rows = []
    for seq_len in args.seq_lens:
        for algo_name in args.algos:
            ours = summary.get((seq_len, algo_name, "theria"))
            for peer in ("reference", "sdpa_math"):
                other = summary.get((seq_len, algo_name, peer))
                if ours and other:
                    ratio_rows.append(
                        [
                            seq_len,
                            algo_name,
                            f"theria / {peer}",
                            ours["ms"] / other["ms"],
                            ours["peak_mb"] / max(other["peak_mb"], 1e-9),
                        ]
                    )
    body = (
        f"One meta-step through a causal pre-LN transformer (depth {args.depth}, width "
        f"{args.dim}, {args.heads} heads, vocab {args.vocab}, {args.dtype}) on a meta-batch of "
        f"{args.tasks} Markov-chain tasks, {args.shots} support + {args.shots} query sequences "
        f"of length L each, tasks processed sequentially. MAML: {args.inner_steps} inner "
        f"step(s), second order. iMAML: {args.inner_steps} inner step(s), {args.cg_iters} CG "
        f"iterations, reverse-over-reverse HVPs. Median of {args.repeats} repeats after a "
        "warm-up; peak = "
        + (
            "CUDA allocator peak above the memory live before the step"
            if device.type == "cuda"
            else "resident memory above the level before the step (sampled)"
        )
        + ". `rel err`: the meta-gradient's relative difference from the `reference` path's.\n\n"
        + markdown_table(["L", "algo", "attn", "median ms", "min ms", "peak MB", "rel err"], rows)
        + "\n\nRatios (below 1: theria is faster / uses less memory):\n\n"
        + markdown_table(["L", "algo", "ratio", "time", "peak memory"], ratio_rows)
        + f"\n\nReproduce: `python -m theria.bench meta --device {device.type} --seq-lens "
        + " ".join(map(str, args.seq_lens))
        + (f" --threads {args.threads}`" if args.threads else "`")
    )
    write_result(
        args.name or f"meta_step_{device.type}",
        f"Meta-step (MAML, iMAML) through a transformer, per attention path, {device.type}",
        env,
        body,
        None if args.out is None else Path(args.out),
    )


if __name__ == "__main__":
    main()
