"""One meta-training step (meta-gradient + Adam update), by how it is executed.

    python -m theria.bench meta [--device cpu|cuda] [--seq-lens 64 256 1024 4096] [--dtype ...]

Strategies (rows), each on the same tasks from the same initial parameters:
    theria      theria's default: `MetaStep` (theria.algos.step) over the task-batched algorithm
                (batching="auto": one vmapped computation for all tasks, attention through
                theria.sdpa with the tasks folded into its batch), captured as a CUDA graph on
                CUDA; eager on the CPU
    sequential  the per-task loop (batching="sequential"), eager: theria.train before the
                batched step
    vmap_math   torch.func throughout with PyTorch's math SDPA: MAML as vmap over tasks of
                grad(query loss after torch.func.grad inner steps); iMAML as
                IMAML(batching="vmap", hvp="fwd_rev")
    higher      higher.innerloop_ctx (MAML only; math SDPA), tasks one after another, as in
                higher's MAML example (pip install higher: skipped with a note if absent)

Columns: median wall ms per step (synchronised), GPU busy (CUDA kernel time from torch.profiler
over the wall time of the profiled steps), peak memory of one step above what was live before,
and accuracy: the meta-gradient's relative error against a float64 meta-gradient from the same
(dtype-rounded) parameters (batched algorithm, reference attention), and the 2x rule (theria's
error at most twice the smallest error of the math-SDPA peers in the same dtype). theria's
meta-gradient is read from an eager batched call: the graph replays the same kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

from theria.algos import IMAML, MAML
from theria.algos.step import MetaStep
from theria.bench import meta_paths
from theria.bench.common import (
    Progress,
    _sync,
    command_line,
    device_kernel_ms,
    environment,
    markdown_table,
    write_result,
)
from theria.models import Transformer
from theria.tasks import Episode, MarkovChainTasks
from theria.tasks.episode import task_loss

STRATEGIES = ("theria", "sequential", "vmap_math", "higher")
Step = Callable[[], dict[str, torch.Tensor] | None]


def _model(args: argparse.Namespace, seq_len: int, attn: str, device, dtype) -> Transformer:
    """The causal transformer of these flags, the same initial parameters for every strategy."""
    cfg = dict(dim=args.dim, depth=args.depth, heads=args.heads, vocab_size=args.vocab,
               causal=True, max_len=seq_len)  # fmt: skip
    return meta_paths._model(cfg, attn, device, dtype)


def _algo(name: str, args: argparse.Namespace, batching: str):
    if name == "maml":
        return MAML(inner_steps=args.inner_steps, inner_lr=args.inner_lr, batching=batching)
    hvp = "fwd_rev" if batching == "vmap" else "rev_rev"
    return IMAML(
        lam=1.0,
        inner_steps=args.imaml_inner_steps,
        inner_lr=args.inner_lr,
        cg_iters=args.cg_iters,
        hvp=hvp,
        batching=batching,
    )


def _adam(params: dict[str, torch.Tensor], device: torch.device) -> torch.optim.Adam:
    cuda = device.type == "cuda"
    lr = torch.tensor(1e-3, device=device) if cuda else 1e-3
    return torch.optim.Adam(list(params.values()), lr=lr, capturable=cuda)


def _apply(params, grads, opt) -> None:
    for k, p in params.items():
        p.grad = grads[k].to(p.dtype)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _func_maml_grads(model, params, tasks: Episode, args) -> dict[str, torch.Tensor]:
    """MAML in torch.func: vmap over tasks of grad(query loss after `inner_steps` steps of
    torch.func.grad on the support loss), averaged. (The torch.func MAML example's other
    structure, vmap of per-task query losses whose inner grad closes over the shared
    parameters, then one autograd backward, gave a meta-gradient 1.6e-3 off in float64 on
    this transformer with torch 2.14: it is not used.)"""
    kind = tasks.loss

    def loss(p, x, y):
        return task_loss(kind, functional_call(model, p, (x,)), y)[0]

    def task(p, sx, sy, qx, qy):
        fast = p
        for _ in range(args.inner_steps):
            g = grad(loss)(fast, sx, sy)
            fast = {k: fast[k] - args.inner_lr * g[k] for k in fast}
        return loss(fast, qx, qy)

    detached = {k: v.detach() for k, v in params.items()}
    grads = vmap(grad(task), in_dims=(None, 0, 0, 0, 0))(detached, *tasks.tensors())
    return {k: g.mean(0) for k, g in grads.items()}


def _higher_grads(model, params, tasks: Episode, args) -> dict[str, torch.Tensor]:
    import higher  # optional peer

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    model.zero_grad(set_to_none=True)
    inner = torch.optim.SGD(model.parameters(), lr=args.inner_lr)
    n = tasks.n_tasks
    for i in range(n):
        t = tasks.task(i)
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(args.inner_steps):
                diffopt.step(task_loss(tasks.loss, fmodel(t.support_x), t.support_y)[0])
            (task_loss(tasks.loss, fmodel(t.query_x), t.query_y)[0] / n).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _strategy(name: str, algo_name: str, args, seq_len: int, tasks: Episode, device, dtype):
    """(step function, meta-gradient function) of one strategy, or a reason it cannot run."""
    if name in ("theria", "sequential"):
        model = _model(args, seq_len, "theria", device, dtype)
        algo = _algo(algo_name, args, "auto" if name == "theria" else "sequential")
        params = algo.init_params(model)
        opt = _adam(params, device)
        step = MetaStep(
            algo, model, params, opt, graph="auto" if name == "theria" else "off", lr_changes=False
        )
        probe = _algo(algo_name, args, "auto" if name == "theria" else "sequential")
        fresh = {k: v.detach().clone() for k, v in params.items()}
        return (lambda: step(tasks)), (lambda: probe(model, fresh, tasks).grads)
    model = _model(args, seq_len, "sdpa_math", device, dtype)
    if name == "higher":
        if algo_name != "maml":
            return "higher: MAML only"
        try:
            import higher  # noqa: F401
        except ImportError:
            return "higher is not installed (pip install higher)"
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        fresh = {k: v.clone() for k, v in params.items()}
        return (
            lambda: [_higher_grads(model, params, tasks, args), None][1],
            lambda: _higher_grads(model, fresh, tasks, args),
        )
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    fresh = {k: v.detach().clone() for k, v in params.items()}
    opt = _adam(params, device)
    if algo_name == "maml":
        grads_of = lambda p: _func_maml_grads(model, p, tasks, args)  # noqa: E731
    else:
        algo = _algo(algo_name, args, "vmap")
        grads_of = lambda p: algo(model, p, tasks).grads  # noqa: E731
    return (lambda: _apply(params, grads_of(params), opt)), (lambda: grads_of(fresh))


def _time(step: Step, device: torch.device, warmup: int, repeats: int, budget_s: float):
    """Median synchronised wall time of a step after `warmup` steps, over `repeats` steps or
    fewer (at least 2) where the steps are slow (`budget_s` of timed steps at most)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < budget_s * 1e3):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    cuda = device.type == "cuda"
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else float("nan")
    return {"ms": statistics.median(times), "ms_min": min(times), "peak_mb": peak, "n": len(times)}


def _busy(step: Step, device: torch.device, wall_ms: float) -> float:
    """CUDA kernel time of one step (torch.profiler, CUDA activity only, so the host is not
    slowed by tracing) over the step's median wall time."""
    return device_kernel_ms(step, device) / wall_ms


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b)
    return float((num / sum((b[k].double() ** 2).sum() for k in b)).sqrt())


def _truth(algo_name, args, seq_len, tasks, device, dtype) -> dict[str, torch.Tensor] | str:
    model = _model(args, seq_len, "reference", device, dtype).double()
    algo = _algo(algo_name, args, "auto")
    try:
        return {k: g.detach() for k, g in algo(model, algo.init_params(model), tasks).grads.items()}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        model = _model(args, seq_len, "theria_torch", device, dtype).double()
        try:
            params = algo.init_params(model)
            return {k: g.detach() for k, g in algo(model, params, tasks).grads.items()}
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return "out of memory"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m theria.bench meta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[16])
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=16, help="meta-batch size")
    ap.add_argument("--shots", type=int, default=4, help="support (= query) sequences per task")
    ap.add_argument("--inner-steps", type=int, default=1, help="MAML inner steps")
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--imaml-inner-steps", type=int, default=5)
    ap.add_argument("--cg-iters", type=int, default=5)
    ap.add_argument("--algos", nargs="+", default=["maml", "imaml"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--no-truth", action="store_true", help="skip the float64 meta-gradient")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps at most")
    ap.add_argument("--max-truth", type=int, default=1 << 30, help="no float64 truth above L")
    ap.add_argument("--max-peer", type=int, default=1 << 30, help="only theria above this L")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: unchanged)")
    ap.add_argument(
        "--out",
        default=None,
        help="results folder (default outputs/bench; the committed tables: experiments/results)",
    )
    ap.add_argument("--name", default=None, help="result file name (default meta_batched_<dev>)")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    rows: list[list] = []
    ratios: list[list] = []
    checks: list[str] = []
    total = len(args.seq_lens) * len(args.algos) * len(args.strategies)
    cpu = device.type == "cpu"
    progress = Progress(total, "meta")
    for seq_len in args.seq_lens:
        sampler = MarkovChainTasks(
            vocab_size=args.vocab, seq_len=seq_len, k_shot=args.shots, k_query=args.shots
        )
        tasks = sampler.sample("train", args.tasks, torch.Generator().manual_seed(seq_len))
        tasks = tasks.to(device)
        for algo_name in args.algos:
            skip_truth = args.no_truth or seq_len > args.max_truth
            truth = None if skip_truth else _truth(algo_name, args, seq_len, tasks, device, dtype)
            res: dict[str, dict] = {}
            for name in args.strategies:
                if name != "theria" and seq_len > args.max_peer:
                    rows.append(
                        [
                            seq_len,
                            algo_name,
                            name,
                            f"not run (L > {args.max_peer})",
                            "",
                            "",
                            "",
                            "",
                            "",
                        ]
                    )
                    continue
                progress.step(f"L={seq_len} {algo_name} {name}")
                made = _strategy(name, algo_name, args, seq_len, tasks, device, dtype)
                if isinstance(made, str):
                    rows.append([seq_len, algo_name, name, made, "", "", "", "", ""])
                    continue
                step, grads_of = made
                try:
                    m = _time(step, device, args.warmup, args.repeats, args.budget)
                    cuda = device.type == "cuda"
                    m["busy"] = _busy(step, device, m["ms"]) if cuda else float("nan")
                    err = "" if not isinstance(truth, dict) else _rel(grads_of(), truth)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    rows.append([seq_len, algo_name, name, "OOM", "", "", "", "", ""])
                    continue
                except (RuntimeError, NotImplementedError) as e:  # a failing peer is a result
                    first = str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
                    rows.append([seq_len, algo_name, name, f"fails: {type(e).__name__}: "
                                 f"{first}", "", "", "", "", ""])  # fmt: skip
                    print(f"  {name} failed: {type(e).__name__}: {first}", flush=True)
                    continue
                m["err"] = err
                res[name] = m
                busy = "" if m["busy"] != m["busy"] else f"{100 * m['busy']:.0f} %"
                rows.append(
                    [
                        seq_len,
                        algo_name,
                        name,
                        m["ms"],
                        m["ms_min"],
                        busy,
                        "" if m["peak_mb"] != m["peak_mb"] else m["peak_mb"],
                        f"{err:.1e}" if err != "" else "",
                        "",
                    ]
                )
            peers = [
                res[p]["err"] for p in ("vmap_math", "higher") if p in res and res[p]["err"] != ""
            ]
            if "theria" in res and res["theria"]["err"] != "":
                verdict = (
                    "n/a (no peer)"
                    if not peers
                    else "pass"
                    if res["theria"]["err"] <= 2 * min(peers)
                    else "FAIL"
                )
                checks.append(f"L={seq_len} {algo_name}: {verdict}")
                for row in rows:
                    if row[:3] == [seq_len, algo_name, "theria"]:
                        row[-1] = verdict
            for peer in ("sequential", "vmap_math", "higher"):
                if "theria" in res and peer in res:
                    a, b = res["theria"], res[peer]
                    ratios.append(
                        [
                            seq_len,
                            algo_name,
                            f"{peer} / theria",
                            b["ms"] / a["ms"],
                            "" if cpu else b["peak_mb"] / max(a["peak_mb"], 1e-9),
                        ]
                    )
            _write(args, ap, device, env, rows, ratios, checks)


def _write(args, ap, device, env, rows, ratios, checks) -> None:
    """Writes the result file (again after each L and algorithm: a cut-short run keeps what
    it measured)."""
    per = (
        "the CUDA allocator's peak above the memory live before"
        if device.type == "cuda"
        else ("not measured on the CPU (see meta-paths for resident-set peaks)")
    )
    body = (
        f"One meta-training step (meta-gradient and an Adam update) through a causal pre-LN "
        f"transformer (depth {args.depth}, width {args.dim}, {args.heads} heads, vocab "
        f"{args.vocab}, {args.dtype}) on a meta-batch of {args.tasks} Markov-chain tasks of "
        f"{args.shots} support + {args.shots} query sequences of length L. MAML: "
        f"{args.inner_steps} inner step(s) of {args.inner_lr}, second order; iMAML: "
        f"{args.imaml_inner_steps} inner steps, {args.cg_iters} CG iterations, λ = 1. Median of up "
        f"to {args.repeats} synchronised steps (fewer, at least 2, past {args.budget} s of "
        f"timed steps) after {args.warmup} warm-up steps (where theria captures its graph); "
        "GPU busy: CUDA kernel time of one profiled step over the median wall time. "
        f"Peak: {per}. `err vs f64`: the meta-gradient's relative "
        "error against a float64 meta-gradient (reference attention) from the same rounded "
        "parameters; `2x rule`: theria's error at most twice the smaller of the math-SDPA "
        "peers' (vmap_math, higher).\n\n"
        + markdown_table(
            [
                "L",
                "algo",
                "strategy",
                "median ms",
                "min ms",
                "GPU busy",
                "peak MB",
                "err vs f64",
                "2x rule",
            ],
            rows,
        )
        + "\n\nSpeed-ups of theria's default (above 1: theria is faster / uses less memory):\n\n"
        + markdown_table(["L", "algo", "ratio", "time", "peak memory"], ratios)
        + (f"\n\n2x rule: {'; '.join(checks)}." if checks else "")
        + f"\n\nReproduce: `{command_line('python -m theria.bench meta', args, ap)}`"
    )
    write_result(
        args.name or f"meta_batched_{device.type}",
        f"Meta-step by execution strategy, {device.type}",
        env,
        body,
        None if args.out is None else Path(args.out),
    )


if __name__ == "__main__":
    main()
