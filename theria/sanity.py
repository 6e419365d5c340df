"""Derivative sanity checks on live parameters and a live task, for logging during training.

    sanity_checks(model, params, task, algo=None) -> dict[str, float]

On one task (the first of a batch), in float64 copies of the parameters and the data (the
live training state is not touched):
  hvp_rev_vs_fwd, hvp_rev_vs_fd, hvp_fwd_vs_fd   relative errors between reverse-over-reverse,
                                                 forward-over-reverse and central-difference
                                                 HVPs of the support loss along a random
                                                 direction (theria.autodiff.check_hvp);
  hvp_symmetry                                   |uᵀHv − vᵀHu| / (‖u‖‖Hv‖ + ‖v‖‖Hu‖);
  maml_fd_rel_err                                for a second-order MAML `algo`: the meta-
                                                 gradient along a random direction u against
                                                 a central difference of the meta-objective,
                                                 |⟨g, u⟩ − fd| / max(|fd|, |⟨g, u⟩|).
In float64 all are ~1e-6 or smaller for a healthy path; a second-order term silently lost
(a first-order result where second order was asked) shows as maml_fd_rel_err of order 1.
Costs a few meta-steps of one task: run it every few hundred steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from theria import autodiff
from theria.algos.common import Params, set_loss
from theria.algos.maml import MAML
from theria.tasks.episode import Episode


def sanity_checks(
    model: nn.Module,
    params: Params,
    task: Episode,
    algo: object | None = None,
    eps: float = 1e-5,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """See the module docstring. `task` may be batched (its first task is used); `params` may
    include Meta-SGD rates when `algo` learns them."""
    if task.support_x.dim() >= 2 and task.task_info.dim() >= 1 and _is_batched(task):
        task = task.task(0)
    task = task.to(dtype=dtype)
    p64 = {k: v.detach().to(dtype) for k, v in params.items()}
    model_names = {k for k, _ in model.named_parameters()}
    theta = {k: v for k, v in p64.items() if k in model_names}
    device = next(iter(theta.values())).device
    g = torch.Generator(device=device).manual_seed(seed)

    def support(p: Params) -> Tensor:
        return set_loss(model, task.loss, p, task.support_x, task.support_y)[0]

    out = {f"hvp_{k}": v for k, v in autodiff.check_hvp(support, theta, generator=g).items()}
    if isinstance(algo, MAML) and not algo.first_order:
        batch = Episode.stack([task])
        u = {
            k: torch.randn(v.shape, generator=g, dtype=dtype, device=v.device)
            for k, v in p64.items()
        }
        norm = torch.sqrt(sum((t**2).sum() for t in u.values()))
        u = {k: t / norm for k, t in u.items()}
        grads = algo(model, p64, batch).grads
        analytic = float(sum((grads[k] * u[k]).sum() for k in u))
        plus = algo(model, {k: v + eps * u[k] for k, v in p64.items()}, batch).loss
        minus = algo(model, {k: v - eps * u[k] for k, v in p64.items()}, batch).loss
        fd = float((plus - minus) / (2 * eps))
        out["maml_fd_rel_err"] = abs(analytic - fd) / max(abs(fd), abs(analytic), 1e-30)
    return out


def _is_batched(task: Episode) -> bool:
    lead = {t.shape[:1] for t in (*task.tensors(), task.task_info)}
    return len(lead) == 1
