"""iMAML: implicit meta-gradients (Rajeswaran et al. 2019).

Per task, the inner problem is proximal (eq. 3 of the paper):
    φ*(θ) = argmin_φ  L_support(φ) + (λ/2)‖φ − θ‖²,
solved approximately by `inner_steps` of gradient descent from φ = θ. Its optimality
condition ∇L_support(φ*) + λ(φ* − θ) = 0 gives, by the implicit function theorem (Lemma 1),
    dφ*/dθ = (I + H/λ)⁻¹,   H = ∇²L_support(φ*),
so the task's meta-gradient is (I + H/λ)⁻¹ ∇L_query(φ*), computed (Algorithm 2) by conjugate
gradients on (I + H/λ) x = ∇L_query(φ*) whose matvec is one Hessian-vector product
(`theria.autodiff.hvp`, reverse-over-reverse or forward-over-reverse). `cg_damping` δ adds δ·x
to the matvec, ((1 + δ)I + H/λ) x = g, keeping the system positive definite where H has small
negative eigenvalues (non-convex support losses). The inner path is never differentiated:
memory does not grow with `inner_steps`.

With `batching="batched"` (what "auto" picks) every task runs at once: φ carries a leading task
dim T, the inner descent, the query gradients and every CG matvec are one vmapped computation
for all tasks (the Hessian of Σ_i L_support,i is block-diagonal over tasks, so one HVP of the
sum gives every task's HVP), and CG keeps per-task scalars (α, β, residuals of shape (T,)).
The same iterations as the per-task loop, so the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from theria import autodiff
from theria._engine import calling_thread
from theria.algos.common import (
    Batching,
    MetaStepResult,
    Params,
    batched_loss,
    check_batching,
    check_inputs,
    per_task,
    query_loss,
    resolve_batching,
    run_tasks,
    second_order_context,
    set_loss,
    summarize,
)
from theria.tasks.episode import Episode


def _dot(a: Params, b: Params, batch: int = 0) -> Tensor:
    """⟨a, b⟩ summed over every tensor of the dicts; with `batch` = 1, per entry of the leading
    (task) dim: shape (T,)."""
    if batch:
        return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)
    return sum((a[k] * b[k]).sum() for k in a)


def _scale(c: Tensor, x: Tensor) -> Tensor:
    """c (), or (T,) per task, times x (T, ...)."""
    return c.reshape(*c.shape, *(1,) * (x.dim() - c.dim())) * x


def conjugate_gradient(matvec, b: Params, iters: int, batch: int = 0) -> tuple[Params, Tensor]:
    """x ≈ A⁻¹ b for a symmetric positive-definite A given by `matvec`, from x₀ = 0, in a fixed
    number of iterations (no data-dependent branch, so it runs under vmap and in a CUDA graph).
    Returns (x, ‖b − A x‖ / ‖b‖ from the recurrence). With `batch` = 1 the tensors carry a
    leading dim of independent systems (tasks): A is block-diagonal over it, and every scalar
    of the recurrence (α, β, the residual) is per system, shape (T,)."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    p = dict(b)
    rs = _dot(r, r, batch)
    b_norm = rs.sqrt()
    tiny = torch.finfo(rs.dtype).tiny
    for _ in range(iters):
        ap = matvec(p)
        pap = _dot(p, ap, batch)
        # when r is already 0, rs = 0 and the step is 0 (guard 0/0 only)
        alpha = rs / torch.where(pap.abs() > tiny, pap, torch.ones_like(pap))
        x = {k: x[k] + _scale(alpha, p[k]) for k in x}
        r = {k: r[k] - _scale(alpha, ap[k]) for k in r}
        rs_new = _dot(r, r, batch)
        beta = rs_new / torch.where(rs > tiny, rs, torch.ones_like(rs))
        p = {k: r[k] + _scale(beta, p[k]) for k in p}
        rs = rs_new
    return x, rs.sqrt() / torch.where(b_norm > tiny, b_norm, torch.ones_like(b_norm))


def true_residual(matvec, b: Params, x: Params, batch: int = 0) -> Tensor:
    """‖b − A x‖ / ‖b‖ computed with one more matvec: what the solve really achieved. CG's
    recurrence residual (the second value of `conjugate_gradient`) keeps falling in floating
    point, or when A is not positive definite, while the true one stalls; only this one shows
    a failed solve. Shape () or, with `batch` = 1, (T,)."""
    ax = matvec(x)
    r = {k: b[k] - ax[k] for k in b}
    b_norm = _dot(b, b, batch).sqrt()
    tiny = torch.finfo(b_norm.dtype).tiny
    return _dot(r, r, batch).sqrt() / torch.where(b_norm > tiny, b_norm, torch.ones_like(b_norm))


@dataclass
class IMAML:
    """iMAML meta-step: `algo(model, params, tasks) -> MetaStepResult`.

    lam: λ, proximal strength; inner_steps / inner_lr: gradient descent on the proximal inner
    problem; cg_iters, cg_damping: the linear solve; hvp: "rev_rev" or "fwd_rev"; batching:
    how the tasks of a meta-batch run ("auto", "batched", "sequential", or "vmap", which
    needs hvp="fwd_rev": the reverse-over-reverse helper uses torch.autograd, which
    torch.func.vmap does not trace). Metrics: query_loss, support_loss_pre,
    query_acc (classification), cg_residual (mean relative residual of CG's recurrence),
    cg_residual_max, cg_true_residual (mean ‖b − A x‖/‖b‖, one extra matvec: the one that shows
    a stalled or indefinite solve), cg_true_residual_max,
    inner_grad_norm (‖∇ of the proximal objective‖ at φ*, 0 when the inner problem is solved).
    """

    lam: float = 1.0
    inner_steps: int = 10
    inner_lr: float = 0.01
    cg_iters: int = 5
    cg_damping: float = 0.0
    hvp: Literal["rev_rev", "fwd_rev"] = "rev_rev"
    batching: Batching = "auto"

    def __post_init__(self) -> None:
        check_batching(self.batching)
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0; got {self.lam}")
        if self.inner_steps < 0 or self.cg_iters < 1:
            raise ValueError(
                f"inner_steps must be >= 0 and cg_iters >= 1; got {self.inner_steps}, "
                f"{self.cg_iters}"
            )
        if not self.inner_lr > 0 or self.cg_damping < 0:
            raise ValueError(
                f"inner_lr must be > 0 and cg_damping >= 0; got {self.inner_lr}, {self.cg_damping}"
            )
        if self.hvp not in ("rev_rev", "fwd_rev"):
            raise ValueError(f"hvp must be 'rev_rev' or 'fwd_rev'; got {self.hvp!r}")
        if self.batching == "vmap" and self.hvp != "fwd_rev":
            raise ValueError(
                "IMAML(batching='vmap') needs hvp='fwd_rev': the 'rev_rev' product runs "
                "torch.autograd.grad, which torch.func.vmap cannot batch"
            )

    def init_params(self, model: nn.Module) -> Params:
        """Fresh leaf copies of the model's parameters: the meta-parameters to optimize."""
        return {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def solve_inner(
        self, model: nn.Module, kind: str, theta: Params, x: Tensor, y: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        """(φ* ≈ argmin L_support + λ/2‖φ − θ‖², support loss at θ, ‖∇ proximal objective‖
        at φ*). Nothing here is differentiated."""
        theta = {k: v.detach() for k, v in theta.items()}

        def prox(p: Params) -> Tensor:
            reg = sum(((p[k] - theta[k]) ** 2).sum() for k in p)
            return set_loss(model, kind, p, x, y)[0] + 0.5 * self.lam * reg

        phi = theta
        loss0 = set_loss(model, kind, theta, x, y)[0].detach()
        for _ in range(self.inner_steps):
            g = torch.func.grad(prox)(phi)
            phi = {k: (phi[k] - self.inner_lr * g[k]).detach() for k in phi}
        g = torch.func.grad(prox)(phi)
        return phi, loss0, _dot(g, g).sqrt().detach()

    def solve_inner_batched(
        self, model: nn.Module, kind: str, theta: Params, x: Tensor, y: Tensor
    ) -> tuple[Params, Tensor, Tensor]:
        """`solve_inner` for T tasks at once: (φ* per task, each (T, ...); support losses at θ
        (T,); ‖∇ proximal objective‖ at φ* (T,)) for support sets x (T, K, ...), y (T, K, ...).
        Nothing here is differentiated with respect to θ."""
        theta = {k: v.detach() for k, v in theta.items()}
        n = x.shape[0]
        anchor = per_task(theta, n)

        def prox_grad(phi: Params) -> tuple[Params, Tensor]:
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            with torch.enable_grad():
                losses, _ = batched_loss(model, kind, leaves, x, y)  # (T,)
                reg = _dot({k: leaves[k] - anchor[k] for k in leaves},
                           {k: leaves[k] - anchor[k] for k in leaves}, 1)  # fmt: skip
                total = (losses + 0.5 * self.lam * reg).sum()  # Σ over independent tasks
                gs = torch.autograd.grad(total, list(leaves.values()))
            return dict(zip(leaves, gs, strict=True)), losses.detach()

        phi, loss0 = anchor, None
        for _ in range(self.inner_steps):
            g, losses = prox_grad(phi)
            loss0 = losses if loss0 is None else loss0
            phi = {k: (phi[k] - self.inner_lr * g[k]).detach() for k in phi}
        g, losses = prox_grad(phi)
        loss0 = losses if loss0 is None else loss0
        return phi, loss0, _dot(g, g, 1).sqrt()

    def _batched(self, model: nn.Module, params: Params, tasks: Episode) -> MetaStepResult:
        kind = tasks.loss
        sx, sy, qx, qy = tasks.tensors()
        phi, loss0, inner_gn = self.solve_inner_batched(model, kind, params, sx, sy)
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        with torch.enable_grad():
            losses, accs = batched_loss(model, kind, leaves, qx, qy)  # (T,)
            gs = torch.autograd.grad(losses.sum(), list(leaves.values()))
        g_q = dict(zip(leaves, gs, strict=True))  # each task's query gradient at its φ*

        def support(q: Params) -> Tensor:  # Σ_i L_support,i: its Hessian is block-diagonal
            return batched_loss(model, kind, q, sx, sy)[0].sum()

        def matvec(v: Params) -> Params:  # ((1 + δ) I + H/λ) v, per task
            hv = autodiff.hvp(support, phi, v, mode=self.hvp)
            return {k: (1 + self.cg_damping) * v[k] + hv[k] / self.lam for k in v}

        x, residual = conjugate_gradient(matvec, g_q, self.cg_iters, batch=1)
        true = true_residual(matvec, g_q, x, batch=1).detach()
        per = {"support_loss_pre": loss0, "cg_residual": residual.detach(),
               "cg_residual_max": residual.detach(), "cg_true_residual": true,
               "cg_true_residual_max": true, "inner_grad_norm": inner_gn}  # fmt: skip
        if accs is not None:
            per["query_acc"] = accs
        stats = summarize(losses, per)
        return MetaStepResult(stats["query_loss"], {k: v.mean(0) for k, v in x.items()}, stats)

    @calling_thread
    def __call__(self, model: nn.Module, params: Params, tasks: Episode) -> MetaStepResult:
        check_inputs(model, params, tasks)
        extra = sorted(set(params) - {k for k, _ in model.named_parameters()})
        if extra:
            raise ValueError(f"IMAML: params has entries that are not model parameters: {extra}")
        kind = tasks.loss
        # The implicit meta-gradient is formed explicitly (CG below), never by autograd through
        # θ: detached params also keep requires_grad leaves out of vmap's forward-mode tracing
        # (there they hit "ZeroTensors are immutable" on this torch).
        params = {k: v.detach() for k, v in params.items()}
        batching = resolve_batching(self.batching, model)
        if batching == "batched":
            with second_order_context(model):
                return self._batched(model, params, tasks)

        def task_fn(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            phi, loss0, inner_gn = self.solve_inner(model, kind, p, sx, sy)
            g_q, (loss, aux) = torch.func.grad(query_loss, argnums=2, has_aux=True)(
                model, kind, phi, qx, qy
            )

            def support(q: Params) -> Tensor:
                return set_loss(model, kind, q, sx, sy)[0]

            def matvec(v: Params) -> Params:  # ((1 + δ) I + H/λ) v, H = ∇²L_support(φ*)
                hv = autodiff.hvp(support, phi, v, mode=self.hvp)
                return {k: (1 + self.cg_damping) * v[k] + hv[k] / self.lam for k in v}

            x, residual = conjugate_gradient(matvec, g_q, self.cg_iters)
            true = true_residual(matvec, g_q, x).detach()
            aux |= {
                "support_loss_pre": loss0,
                "cg_residual": residual.detach(),
                "cg_residual_max": residual.detach(),
                "cg_true_residual": true,
                "cg_true_residual_max": true,
                "inner_grad_norm": inner_gn,
            }
            return {k: v.detach() for k, v in x.items()}, (loss, aux)

        with second_order_context(model):
            return run_tasks(task_fn, params, tasks, batching == "vmap")
