"""Meta-steps per second of data-parallel meta-training on this CPU: 1 process vs 2 gloo
processes over the same total meta-batch (theria.distributed).

    python experiments/dist_cpu.py            # writes experiments/results/dist_cpu.md

Each configuration is started with torchrun (`--standalone`); rank 0 times windows of
meta-steps (sample this rank's tasks, meta-gradient, all-reduce, optimizer step: the trainer's
step) between barriers. The configurations are run in interleaved rounds (every layout once
per round), so that a change in the machine's load falls on all of them alike, and the
driver reports the median window over all rounds. The rates include the all-reduce and the
task sampling; evaluation and logging are not part of a meta-step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, description) -> builder arguments; meta_batch is the total over ranks
WORKLOADS = {
    "markov-transformer-maml": "MAML (1 inner step), transformer D=32, 2 blocks, 4 heads, "
    "attn=theria, Markov chains V=8, L=32, 4+4 sequences per task, float32",
    "sinusoid-mlp-maml": "MAML (1 inner step), MLP 1-40-40-1, sinusoid 10+10 shots, float32",
}
META_BATCH = 8
# (processes, torch threads per process)
LAYOUTS = [(1, 1), (1, 2), (2, 1)]


def _build(workload: str):
    import torch

    from theria.algos import MAML
    from theria.models import MLP, MLPConfig, Transformer, TransformerConfig
    from theria.tasks import MarkovChainTasks, SinusoidTasks

    torch.manual_seed(0)
    if workload == "markov-transformer-maml":
        cfg = TransformerConfig(dim=32, depth=2, heads=4, mlp_ratio=2.0, vocab_size=8,
                                causal=True, attn="theria")  # fmt: skip
        model = Transformer(cfg)
        sampler = MarkovChainTasks(vocab_size=8, seq_len=32, k_shot=4, k_query=4)
    elif workload == "sinusoid-mlp-maml":
        model = MLP(MLPConfig(hidden=(40, 40)))
        sampler = SinusoidTasks(k_shot=10, k_query=10)
    else:
        raise ValueError(f"workload must be one of {list(WORKLOADS)}; got {workload!r}")
    return model, MAML(inner_steps=1, inner_lr=0.01), sampler


def worker(args: argparse.Namespace) -> None:
    """One rank: warm-up, then `repeats` windows of `steps` meta-steps; rank 0 writes the
    windows' rates to args.out."""
    import torch

    from theria import distributed as D

    torch.set_num_threads(args.threads)
    ctx = D.setup(backend="gloo", device="cpu", timeout_s=600)
    model, algo, sampler = _build(args.workload)
    params = algo.init_params(model)
    opt = torch.optim.Adam(list(params.values()), lr=1e-3)
    gen = D.task_generator(0, ctx.rank)
    n_local = D.local_batch(META_BATCH, ctx)

    def step() -> None:
        tasks = sampler.sample("train", n_local, gen)
        result = D.reduce_result(algo(model, params, tasks), ctx)
        for k, p in params.items():
            p.grad = result.grads[k]
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    rates = []
    for _ in range(args.repeats):
        D.barrier(ctx)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        D.barrier(ctx)
        rates.append(args.steps / (time.perf_counter() - t0))
    D.assert_same_params(params, ctx)
    if ctx.is_main:
        Path(args.out).write_text(json.dumps({"rates": rates}))
    D.teardown(ctx)


def run_layout(workload: str, procs: int, threads: int, steps: int, repeats: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rates.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}", str(Path(__file__).resolve()), "--worker",
               "--workload", workload, "--threads", str(threads), "--steps", str(steps),
               "--repeats", str(repeats), "--out", str(out)]  # fmt: skip
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        if proc.returncode != 0:
            if not out.exists():
                raise RuntimeError(f"{workload} {procs}x{threads}: the job failed (exit "
                                   f"{proc.returncode}) before writing its rates")  # fmt: skip
            # gloo occasionally aborts a rank at process exit, after the work (see
            # tests/distributed/launch.py); the rates were written before that
            print(f"note: {workload} {procs}x{threads} exited {proc.returncode} after writing "
                  "its rates", flush=True)  # fmt: skip
        return json.loads(out.read_text())["rates"]


def main(args: argparse.Namespace) -> None:
    import torch

    from theria.bench.common import environment, markdown_table, write_result

    load_before = os.getloadavg()
    rates: dict[tuple[str, int, int], list[float]] = {}
    for r in range(args.rounds):
        for workload in WORKLOADS:
            for procs, threads in LAYOUTS:
                got = run_layout(workload, procs, threads, args.steps, args.repeats)
                rates.setdefault((workload, procs, threads), []).extend(got)
                print(f"round {r}: {workload} {procs}x{threads}: {got}", flush=True)
    load_after = os.getloadavg()
    rows = []
    for workload in WORKLOADS:
        base = statistics.median(rates[(workload, *LAYOUTS[0])])
        for procs, threads in LAYOUTS:
            w = rates[(workload, procs, threads)]
            med = statistics.median(w)
            rows.append([workload, procs, threads, META_BATCH // procs, med, min(w), max(w),
                         med / base])  # fmt: skip
    env = environment("cpu")
    env["threads"] = "per row (torch.set_num_threads in each process)"
    env["load average (1 min) before / after"] = f"{load_before[0]:.2f} / {load_after[0]:.2f}"
    env["cores"] = str(os.cpu_count())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()  # fmt: skip
    env["commit"] = commit + (" (with uncommitted changes)" if dirty else " (clean tree)")
    table = markdown_table(["workload", "processes", "threads/process", "tasks/rank",
                            "meta-steps/s (median)", "min", "max", "vs 1×1"], rows)  # fmt: skip
    workloads = "\n".join(f"- `{k}`: {v}" for k, v in WORKLOADS.items())
    body = f"""Same total meta-batch ({META_BATCH} tasks per meta-step) in every row: one process
draws all {META_BATCH}; two gloo processes (torchrun --standalone, 127.0.0.1) draw
{META_BATCH // 2} each from their own streams and average their meta-gradients with one
all-reduce per step (theria.distributed.reduce_result). A meta-step here is the trainer's:
task sampling, meta-gradient, all-reduce, Adam step. Each row: {args.rounds} interleaved
rounds (a fresh torchrun job each) of {args.repeats} windows of {args.steps} meta-steps
after {args.warmup} warm-up steps; the median window rate over all rounds, with the slowest
and fastest window. torch {torch.__version__}.

{workloads}

{table}

Caveats: this machine has {os.cpu_count()} cores and other engineers' jobs ran at the same
time (load average above), so the rates are noisy (see the min-max spread): read the
medians, and compare rows of one run only. On an idle machine two processes on two cores can
at best double the rate of 1 process × 1 thread; the 1 process × 2 threads row is the other
use of the same two cores (torch intra-op threads).
"""
    write_result("dist_cpu", "Data-parallel meta-training on the CPU: 1 vs 2 processes",
                 env, body)  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workload", default="markov-transformer-maml")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=4, help="meta-steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per job")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all layouts")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.worker:
        worker(a)
    else:
        main(a)
