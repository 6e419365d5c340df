"""One meta-step (MAML, iMAML) through a transformer, per attention path.

    python -m theria.bench meta-paths [--device cpu|cuda] [--seq-lens 256 512] [--out DIR]

A meta-step is `algo(model, params, tasks)` on a meta-batch of few-shot next-token tasks
(random Markov chains, causal attention): the inner loop on each task's support sequences, the
query loss, and the meta-gradient. MAML differentiates through the inner step (double
backward through every attention call); iMAML solves the proximal inner problem and runs CG
whose matvec is a Hessian-vector product (reverse-over-reverse by default). Tasks are
processed one after another, so peak memory is that of one task's graph.

Paths: `theria` (theria.sdpa backend auto: the Triton kernels for CUDA inputs in 16-bit, or
in float32 with heads up to 64 wide, else the blockwise torch Functions), `theria_triton`
(backend "triton"), `reference` (theria's explicit composition), `sdpa_math` (PyTorch's
math SDPA), and `sdpa` (PyTorch's default dispatch: its fused kernels have no double
backward, so the step fails; listed to show it fails loudly). `rel err` is the
meta-gradient's relative difference from the `reference` path's (same parameters, same tasks).

Below float64 (`--dtype float32|bfloat16|float16`), each path is also compared with a float64
meta-gradient taken from the same (rounded) parameters and tasks: `err vs f64`. The float64
truth comes from the `reference` path, or, where that runs out of memory (its L x S
intermediates), from `theria_torch` (checked against `reference` by gradcheck in the tests);
the table names which. `2x rule` holds when a theria path's error is at most twice the smallest
error among the peers (`reference`, `sdpa_math`) in the same dtype: the accuracy criterion of
the kernel benchmarks, applied to a whole meta-step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from theria.algos import IMAML, MAML
from theria.bench.common import (
    Progress,
    command_line,
    environment,
    markdown_table,
    measure,
    write_result,
)
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


def _model(cfg: dict, path: str, device: torch.device, dtype: torch.dtype) -> Transformer:
    """The transformer with attention `path`, the same initial parameters for every path (and
    for the float64 truth: rounded to `dtype` first, then widened)."""
    torch.manual_seed(0)
    return Transformer(TransformerConfig(**cfg, attn=path)).to(device, dtype)


def _truth(algo, cfg: dict, tasks, device: torch.device, dtype: torch.dtype):
    """(path name, meta-gradient) in float64 from the `dtype`-rounded parameters, or
    (why not, None) when no path could take the step (out of memory, or an error)."""
    why = ""
    for path in ("reference", "theria_torch"):
        model = _model(cfg, path, device, dtype).double()
        params = algo.init_params(model)
        print(f"  float64 truth through {path} ...", flush=True)
        try:
            return path, {k: g.detach() for k, g in algo(model, params, tasks).grads.items()}
        except RuntimeError as e:  # torch.OutOfMemoryError included; a CPU one is plain
            why = "out of memory" if "out of memory" in str(e).lower() else type(e).__name__
            del model, params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return f"none ({why})", None


def _truth_columns(
    rows: list[list], seq_len: int, algo_name: str, grads: dict, truth: dict | None, checks: list
) -> None:
    """Adds `err vs f64` and `2x rule` to this (L, algo)'s rows (blank without a truth);
    records each theria verdict."""
    errs = {} if truth is None else {path: _rel(g, truth) for path, g in grads.items()}
    peers = [errs[p] for p in ("reference", "sdpa_math") if p in errs]
    bound = 2 * min(peers) if peers else None
    for row in rows:
        if row[:2] != [seq_len, algo_name] or len(row) != 7:
            continue
        path = row[2]
        if path not in errs:
            row += ["", ""]
            continue
        verdict = ""
        if path.startswith("theria"):
            verdict = (
                "n/a (no peer)" if bound is None else "pass" if errs[path] <= bound else "FAIL"
            )
            checks.append(f"L={seq_len} {algo_name} {path} {verdict}")
        row += [f"{errs[path]:.1e}", verdict]


def _truth_text(dtype: torch.dtype, truths: dict[tuple[int, str], str]) -> str:
    if not truths:
        why = "float64 is the truth" if dtype == torch.float64 else "--no-truth"
        return f"`err vs f64` and `2x rule` are not computed ({why})."

    def name(t: str) -> str:
        return t if t.startswith("none") else f"`{t}`"

    used = sorted(set(truths.values()))
    return (
        "`err vs f64`: relative difference from a float64 meta-gradient taken from the same "
        f"{str(dtype).removeprefix('torch.')}-rounded parameters (float64 truth through "
        + (
            name(used[0])
            if len(used) == 1
            else ", ".join(f"L={L} {a}: {name(t)}" for (L, a), t in truths.items())
        )
        + "). `2x rule`: a theria path's `err vs f64` is at most twice the smallest of the "
        "peers' (`reference`, `sdpa_math`) in the same dtype."
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench meta-paths",
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
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"]
    )
    ap.add_argument(
        "--no-truth", action="store_true", help="skip the float64 meta-gradient (err vs f64)"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: unchanged)")
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default outputs/bench; the committed tables: experiments/results)",
    )
    ap.add_argument("--name", default=None, help="result file name (default meta_step_<device>)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
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
    rows: list[list] = []
    summary: dict[tuple, dict[str, float]] = {}
    truths: dict[tuple[int, str], str] = {}
    checks: list[str] = []
    progress = Progress(len(args.seq_lens) * len(args.algos) * len(args.paths), "bench meta-paths")
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
            grads: dict[str, dict[str, torch.Tensor]] = {}
            truth = None
            if dtype != torch.float64 and not args.no_truth:
                truths[(seq_len, algo_name)], truth = _truth(algo, cfg, tasks, device, dtype)
            for path in sorted(args.paths, key=lambda p: p != "reference"):  # reference first
                model = _model(cfg, path, device, dtype)
                params = algo.init_params(model)
                progress.step(f"L={seq_len} {algo_name} {path}")
                last = {}

                def step(a=algo, mo=model, p=params, t=tasks, last=last):
                    last["grads"] = a(mo, p, t).grads

                try:
                    m = measure(step, device, args.repeats)
                except RuntimeError as e:  # a path that cannot take the step is a result
                    first = str(e).split(":")[0]
                    rows.append([seq_len, algo_name, path, "fails", "", "", first[:60], "", ""])
                    continue
                if "oom" in m:
                    rows.append([seq_len, algo_name, path, "OOM", "", "", "", "", ""])
                    continue
                grads[path] = last["grads"]
                ref = grads.get("reference")
                err = "" if ref is None else f"{_rel(grads[path], ref):.1e}"
                summary[(seq_len, algo_name, path)] = m
                rows.append([seq_len, algo_name, path, m["ms"], m["ms_min"], m["peak_mb"], err])
            _truth_columns(rows, seq_len, algo_name, grads, truth, checks)
    ratio_rows = []
    for seq_len in args.seq_lens:
        for algo_name in args.algos:
            ours = summary.get((seq_len, algo_name, "theria"))
            for peer in ("theria_torch", "reference", "sdpa_math"):
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
        + ". `rel err`: the meta-gradient's relative difference from the `reference` path's "
        "in the same dtype. "
        + _truth_text(dtype, truths)
        + "\n\n"
        + markdown_table(
            [
                "L",
                "algo",
                "attn",
                "median ms",
                "min ms",
                "peak MB",
                "rel err",
                "err vs f64",
                "2x rule",
            ],
            rows,
        )
        + "\n\nRatios (below 1: theria is faster / uses less memory):\n\n"
        + markdown_table(["L", "algo", "ratio", "time", "peak memory"], ratio_rows)
        + (f"\n\n2x rule: {'; '.join(checks)}." if checks else "")
        + f"\n\nReproduce: `{command_line('python -m theria.bench meta-paths', args, ap)}`"
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
