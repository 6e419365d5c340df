"""Experiment (1): MAML and FO-MAML on sinusoid regression with the set-up of Finn et al. 2017
(§5.1: 2 × 40 ReLU MLP, K ∈ {5, 10, 20} support points, meta-batch 25, one inner step of
size 0.01, Adam 1e-3), next to a peer library's MAML (`higher`, Grefenstette et al. 2019) on
the same tasks, the same initialization and the same seeds. Reports the meta-test MSE against
the number of gradient steps taken at test time, as in the paper's Figure 2 (left).

    python experiments/exp_sinusoid.py [--steps 2000] [--seeds 0 1] [--k 5 10 20] [--jobs 4]

theria's runs go through the experiment app (`theria.train.train` with
conf/experiment/exp_sinusoid.yaml); the `higher` runs are a plain loop written here. Both
draw their training tasks from `theria.train.task_generator(seed)`. Writes
experiments/results/exp_sinusoid.{md,png,json}. Needs the optional extra: pip install
'theria[experiments]' (for `higher`).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from exp_common import RESULTS, ROOT, machine, pm, table

from theria.algos import MAML
from theria.tasks import SinusoidTasks
from theria.train import adaptation_curve, compose_config, mean_ci95, task_generator, train
from theria.train.build import build_model, build_sampler, check_config
from theria.train.checkpoint import CHECKPOINT, load_checkpoint

METHODS = ("theria MAML", "theria FO-MAML", "higher MAML")
TEST_SEED, N_TEST, K_QUERY_TEST, CURVE_STEPS = 4242, 300, 100, 10


def need_higher():
    try:
        import higher
    except ImportError:
        sys.exit(
            "exp_sinusoid.py compares against the peer library `higher`, which is not "
            "installed: pip install 'theria[experiments]' (or pip install higher)"
        )
    return higher


def config(k: int, seed: int, steps: int, algo: str = "maml"):
    return check_config(compose_config([
        "experiment=exp_sinusoid", "device=cpu", f"task.k_shot={k}", f"algo={algo}", f"seed={seed}",
        f"steps={steps}", "algo.batching=batched", "algo.eval_inner_steps=10", "logger=none",
        f"eval_every={max(1, steps // 4)}", f"checkpoint_every={max(1, steps // 4)}",
        f"sanity_every={max(1, steps // 4)}", "val_tasks=50", "test_tasks=100", "threads=1",
    ]))  # fmt: skip


def higher_maml_step(higher, model, meta_opt, inner_opt, tasks, inner_steps: int) -> float:
    """One MAML meta-step written with `higher`: per task, a differentiable inner SGD loop on
    the support loss, then the query loss (averaged over the tasks) backpropagated to θ."""
    meta_opt.zero_grad()
    total = 0.0
    for i in range(tasks.n_tasks):
        sx, sy, qx, qy = (t[i] for t in tasks.tensors())
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, opt):
            for _ in range(inner_steps):
                opt.step((fmodel(sx) - sy).square().mean())
            loss = (fmodel(qx) - qy).square().mean() / tasks.n_tasks
            loss.backward()
            total += float(loss.detach())
    meta_opt.step()
    return total


def train_higher(cfg) -> dict[str, torch.Tensor]:
    """MAML with `higher`, from the same initialization and task stream as theria.train."""
    higher = need_higher()
    torch.manual_seed(cfg.seed)  # theria.train seeds the same way before building the model
    model = build_model(cfg)
    sampler, gen = build_sampler(cfg), task_generator(cfg.seed)
    meta_opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.algo.inner_lr)
    for _ in range(cfg.steps):
        tasks = sampler.sample("train", cfg.meta_batch, gen)
        higher_maml_step(higher, model, meta_opt, inner_opt, tasks, cfg.algo.inner_steps)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def job(method: str, k: int, seed: int, steps: int, runs: str) -> dict:
    torch.set_num_threads(1)
    algo = "fomaml" if "FO" in method else "maml"
    cfg = config(k, seed, steps, algo)
    if method.startswith("higher"):
        params = train_higher(cfg)
    else:
        run_dir = Path(runs) / f"k{k}_{algo}_s{seed}"
        train(cfg, run_dir=run_dir)
        params = load_checkpoint(run_dir / CHECKPOINT)["params"]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    tasks = SinusoidTasks(k_shot=k, k_query=K_QUERY_TEST).sample(
        "test", N_TEST, torch.Generator().manual_seed(TEST_SEED)
    )
    curve = adaptation_curve(model, params, tasks, lr=cfg.algo.inner_lr, steps=CURVE_STEPS)
    return {"method": method, "k": k, "seed": seed, "curve": curve.tolist(), "params": params}


def first_step_gradient_gap(k: int) -> float:
    """max |theria MAML meta-gradient − higher's| at the initialization, on the first batch."""
    higher = need_higher()
    cfg = config(k, 0, 1)
    torch.manual_seed(0)
    model = build_model(cfg)
    tasks = build_sampler(cfg).sample("train", cfg.meta_batch, task_generator(0))
    algo = MAML(inner_steps=1, inner_lr=cfg.algo.inner_lr)
    ours = algo(model, algo.init_params(model), tasks).grads
    meta_opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a step of size 0: grads only
    inner_opt = torch.optim.SGD(model.parameters(), lr=cfg.algo.inner_lr)
    higher_maml_step(higher, model, meta_opt, inner_opt, tasks, 1)
    return max(float((p.grad - ours[n]).abs().max()) for n, p in model.named_parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--runs", default=str(ROOT / "outputs" / "exp_sinusoid"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    need_higher()
    grid = [(m, k, s) for k in args.k for s in args.seeds for m in METHODS]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(job, m, k, s, args.steps, args.runs) for m, k, s in grid]
        done = [f.result() for f in futures]
    gaps = {k: first_step_gradient_gap(k) for k in args.k}
    write(done, gaps, args)


def write(done: list[dict], gaps: dict[int, float], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    curves: dict[tuple[str, int], torch.Tensor] = {}
    for k in args.k:
        for m in METHODS:
            rows = [torch.tensor(d["curve"]) for d in done if d["k"] == k and d["method"] == m]
            curves[m, k] = torch.cat(rows)  # (seeds · tasks, steps + 1)
    drift = {}
    for k in args.k:
        for s in args.seeds:
            a = next(d for d in done if (d["method"], d["k"], d["seed"]) == ("theria MAML", k, s))
            b = next(d for d in done if (d["method"], d["k"], d["seed"]) == ("higher MAML", k, s))
            drift[k, s] = max(
                float((a["params"][n] - b["params"][n]).abs().max()) for n in a["params"]
            )
    rows = []
    for k in args.k:
        for m in METHODS:
            c = curves[m, k]
            stats = [mean_ci95(c[:, i]) for i in (0, 1, 10)]
            rows.append([k, m, *(pm(s["mean"], s["ci95"]) for s in stats)])
    md = [
        "# Experiment (1): sinusoid regression, MAML / FO-MAML (theria) vs MAML (higher)",
        "",
        f"Reduced scale: **{args.steps} meta-training steps** (Finn et al. 2017 train 70 000), "
        f"seeds {args.seeds}; otherwise their set-up: 2 × 40 ReLU MLP, meta-batch 25, one "
        "inner SGD step of size 0.01 during meta-training, Adam 1e-3. Meta-test: "
        f"{N_TEST} tasks from held-out (A, φ) cells, K support points, {K_QUERY_TEST} query "
        "points, plain gradient steps of size 0.01 at test time. Mean ± 95% CI over "
        f"tasks × seeds (n = {N_TEST * len(args.seeds)}). Measured on {machine()}.",
        "",
        table(["K", "method", "MSE, 0 steps", "MSE, 1 step", "MSE, 10 steps"], rows),
        "Same initialization, same task stream: theria's MAML and higher's compute the same "
        "meta-gradient. At the first step, max |Δ meta-gradient| (float32): "
        + ", ".join(f"K={k}: {g:.1e}" for k, g in gaps.items())
        + ". After training, max |Δθ| between the two (float32 rounding, compounded over "
        "the steps by Adam): "
        + ", ".join(f"K={k} seed {s}: {d:.1e}" for (k, s), d in drift.items())
        + ".",
        "",
        "![MSE against adaptation steps](exp_sinusoid.png)",
        "",
    ]
    (args.out / "exp_sinusoid.md").write_text("\n".join(md))
    fig, axes = plt.subplots(1, len(args.k), figsize=(4.2 * len(args.k), 3.6), squeeze=False)
    for ax, k in zip(axes[0], args.k, strict=True):
        for m, style in zip(METHODS, ("-o", "-s", "--^"), strict=True):
            c = curves[m, k]
            stats = [mean_ci95(c[:, i]) for i in range(c.shape[1])]
            mean = torch.tensor([s["mean"] for s in stats])
            ci = torch.tensor([s["ci95"] for s in stats])
            ax.plot(range(c.shape[1]), mean, style, ms=3, label=m)
            ax.fill_between(range(c.shape[1]), mean - ci, mean + ci, alpha=0.15)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("gradient steps at meta-test")
        ax.set_ylabel("query MSE")
        ax.legend(fontsize=7)
    fig.suptitle(f"Sinusoid, {args.steps} meta-training steps, seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(args.out / "exp_sinusoid.png", dpi=120)
    summary = {
        "steps": args.steps, "seeds": args.seeds, "machine": machine(),
        "first_step_gradient_gap": gaps,
        "param_drift": {f"k{k}_s{s}": d for (k, s), d in drift.items()},
        "curves_mean": {f"{m} K={k}": curves[m, k].mean(0).tolist() for (m, k) in curves},
    }  # fmt: skip
    (args.out / "exp_sinusoid.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
