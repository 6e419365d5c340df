"""Meta-validation / meta-test: adapt to each task's support set, measure the query set, and
summarize over tasks with a 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from theria._engine import calling_thread
from theria.algos import IMAML, LR_PREFIX, MAML, Params
from theria.algos.common import set_loss
from theria.tasks import Episode, TaskSampler


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (so mean ± t·s/√n is a
    95% interval). dof 1 and 2 in closed form; from 3 on the Cornish-Fisher-type expansion of
    Abramowitz & Stegun 26.7.5 around the normal quantile (error < 2e-3 at dof = 3, smaller
    beyond)."""
    if dof < 1:
        raise ValueError(f"dof must be >= 1; got {dof}")
    if dof == 1:
        return math.tan(math.pi * 0.475)  # Cauchy: tan(π(p − 1/2))
    if dof == 2:
        p = 0.975
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))  # t₂: (2p − 1)·√(2 / (4p(1 − p)))
    z, n = 1.959963984540054, dof  # the normal 0.975 quantile
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / n + g2 / n**2 + g3 / n**3 + g4 / n**4


def mean_ci95(values: Sequence[float] | Tensor) -> dict[str, float]:
    """{"mean", "ci95" (half-width, Student t), "std" (sample), "n"} of a set of values."""
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = x.numel()
    if n == 0:
        raise ValueError("mean_ci95: no values")
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "ci95": float("nan"), "std": float("nan"), "n": 1}
    std = float(x.std(unbiased=True))
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n), "std": std, "n": n}


def adapt(
    algo: MAML | IMAML, model: nn.Module, kind: str, params: Params, x: Tensor, y: Tensor,
    steps: int,
) -> Params:  # fmt: skip
    """The task-adapted model parameters after `steps` inner steps of the algorithm's inner
    problem, from θ = `params`: MAML/FO-MAML descend the support loss with step α (the learned
    Meta-SGD rates when present); iMAML descends its proximal objective
    L_support(φ) + λ/2‖φ − θ‖² (Rajeswaran et al. 2019, eq. 3). Nothing is differentiated
    with respect to θ: this is test-time adaptation."""
    theta = {k: v.detach() for k, v in params.items() if not k.startswith(LR_PREFIX)}
    lam = algo.lam if isinstance(algo, IMAML) else 0.0
    rates = {k: params[LR_PREFIX + k].detach() if LR_PREFIX + k in params else algo.inner_lr
             for k in theta}  # fmt: skip

    def inner_objective(p: Params) -> Tensor:
        loss = set_loss(model, kind, p, x, y)[0]
        if lam:
            loss = loss + 0.5 * lam * sum(((p[k] - theta[k]) ** 2).sum() for k in p)
        return loss

    phi = theta
    for _ in range(steps):
        g = torch.func.grad(inner_objective)(phi)
        phi = {k: phi[k] - rates[k] * g[k] for k in phi}
    return phi


@torch.no_grad()
@calling_thread
def evaluate_tasks(
    algo: MAML | IMAML, model: nn.Module, params: Params, tasks: Episode, steps: int
) -> dict[str, Tensor]:
    """Per task (T,) values: support/query loss before (θ) and after adaptation (φ), and the
    query/support accuracy before/after for classification. (torch.func.grad inside the
    adaptation ignores the outer no_grad, as function transforms do.)"""
    kind = tasks.loss
    model_params = {k: v.detach() for k, v in params.items() if not k.startswith(LR_PREFIX)}
    out: dict[str, list[Tensor]] = {}
    for i in range(tasks.n_tasks):
        sx, sy, qx, qy = (t[i] for t in tasks.tensors())
        phi = adapt(algo, model, kind, params, sx, sy, steps)
        for when, p in (("pre", model_params), ("post", phi)):
            for split, x, y in (("support", sx, sy), ("query", qx, qy)):
                loss, acc = set_loss(model, kind, p, x, y)
                out.setdefault(f"{split}_loss_{when}", []).append(loss.detach())
                if acc is not None:
                    out.setdefault(f"{split}_acc_{when}", []).append(acc.detach())
    return {k: torch.stack(v).double().cpu() for k, v in out.items()}


@calling_thread
def evaluate(
    algo: MAML | IMAML,
    model: nn.Module,
    params: Params,
    sampler: TaskSampler,
    split: str,
    n_tasks: int,
    seed: int,
    steps: int,
    chunk: int = 25,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], object] | None = None,
) -> dict[str, dict[str, float]]:
    """Mean and 95% CI over `n_tasks` tasks of `split`, the same tasks for the same `seed`
    (drawn in chunks of `chunk` to bound memory). Keys as in `evaluate_tasks`. `progress`,
    when given, is called with the number of tasks done after each chunk (a bar's update)."""
    g = torch.Generator().manual_seed(seed)
    per_task: dict[str, list[Tensor]] = {}
    done = 0
    while done < n_tasks:
        n = min(chunk, n_tasks - done)
        tasks = sampler.sample(split, n, g).to(device, dtype)  # type: ignore[arg-type]
        for k, v in evaluate_tasks(algo, model, params, tasks, steps).items():
            per_task.setdefault(k, []).append(v)
        done += n
        if progress is not None:
            progress(n)
    return {k: mean_ci95(torch.cat(v)) for k, v in per_task.items()}


@torch.no_grad()
@calling_thread
def adaptation_curve(
    model: nn.Module, params: Params, tasks: Episode, lr: float, steps: int
) -> Tensor:
    """(T, steps + 1) query losses after 0, 1, ..., `steps` plain gradient steps of size `lr`
    on each task's support loss: the curve of Finn et al. 2017, Figure 2 (left)."""
    kind = tasks.loss
    theta = {k: v.detach() for k, v in params.items() if not k.startswith(LR_PREFIX)}
    rows = []
    for i in range(tasks.n_tasks):
        sx, sy, qx, qy = (t[i] for t in tasks.tensors())

        def support(q: Params, sx: Tensor = sx, sy: Tensor = sy) -> Tensor:
            return set_loss(model, kind, q, sx, sy)[0]

        p, row = theta, []
        for s in range(steps + 1):
            row.append(set_loss(model, kind, p, qx, qy)[0])
            if s < steps:
                g = torch.func.grad(support)(p)
                p = {k: p[k] - lr * g[k] for k in p}
        rows.append(torch.stack(row))
    return torch.stack(rows).double().cpu()
