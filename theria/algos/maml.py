"""MAML and FO-MAML (Finn et al. 2017, Algorithm 2), with optional Meta-SGD inner learning
rates (Li et al. 2017: one learned rate per parameter entry).

Per task, from parameters θ: `inner_steps` of gradient descent on the support loss,
    φ₀ = θ,  φ_{s+1} = φ_s − α ⊙ ∇L_support(φ_s),
then the query loss L_query(φ_S). The meta-objective is its mean over tasks; its gradient
with respect to θ (and α when learned) is the meta-gradient. MAML differentiates through the
inner gradients (second order: Hessian-vector products of the support loss, hence through
the attention's double backward); FO-MAML treats them as constants (§5.2 of Finn et al.), so
its meta-gradient is ∇L_query evaluated at φ_S (for θ).

How the tasks of a meta-batch run (`batching`, see theria.algos.common):
- "batched" (what "auto" picks): all tasks at once. The fast weights φ carry a leading task
  dim T (φ₀ = θ expanded, a view), the model runs once per step under torch.func.vmap, and the
  inner gradients are torch.autograd.grad(Σ_i L_support,i(φ_i), φ, create_graph=True): one
  batched backward whose attention calls are theria's (Triton on CUDA) kernels over T·B·H
  rows. The meta-gradient is one plain backward of the mean query loss, so attention runs its
  memory-efficient second-order pass (never the O(L·S) third-order one).
- "sequential": tasks one after another, the same autograd calls per task.
- "vmap": torch.func throughout (grad of grad, vmapped over tasks): the same numbers, but
  torch.func differentiates every level with create_graph, so theria's attention takes its
  third-order path there (O(L·S) memory, like the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from theria._engine import calling_thread
from theria._warnings import warn_once
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

LR_PREFIX = "inner_lr/"  # Meta-SGD rates live in the params dict as "inner_lr/<param name>"


@dataclass
class MAML:
    """MAML / FO-MAML meta-step: `algo(model, params, tasks) -> MetaStepResult`.

    inner_steps: S ≥ 1 gradient steps on the support set; inner_lr: α (the initial value of
    the learned rates when `learn_inner_lr`); first_order: FO-MAML; learn_inner_lr: Meta-SGD
    (params must then hold "inner_lr/<name>" entries, see `init_params`); batching: how the
    tasks of a meta-batch run ("auto", "batched", "sequential", "vmap"; module docstring).
    """

    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    learn_inner_lr: bool = False
    batching: Batching = "auto"

    def __post_init__(self) -> None:
        check_batching(self.batching)
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1; got {self.inner_steps}")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0; got {self.inner_lr}")

    def init_params(self, model: nn.Module) -> Params:
        """Fresh leaf copies of the model's parameters (+ Meta-SGD rates, filled with
        inner_lr, when learn_inner_lr): the meta-parameters to optimize."""
        params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
        if self.learn_inner_lr:
            for k in list(params):
                params[LR_PREFIX + k] = torch.full_like(params[k], self.inner_lr).requires_grad_()
        return params

    def adapt(
        self, model: nn.Module, kind: str, params: Params, x: Tensor, y: Tensor, functional: bool
    ) -> tuple[Params, Tensor]:
        """(adapted model params φ_S, support loss at θ) for one task's support set x, y.

        functional=True takes inner gradients with torch.func.grad (traceable by vmap);
        functional=False with torch.autograd.grad(create_graph=not first_order), on params
        that are leaves requiring grad.
        """
        theta = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
        if self.learn_inner_lr:
            lrs = {k: params[LR_PREFIX + k] for k in theta}
        fast, loss0 = theta, None
        for _ in range(self.inner_steps):
            if functional:
                g, loss = torch.func.grad_and_value(lambda p: set_loss(model, kind, p, x, y)[0])(
                    fast
                )
            else:
                loss = set_loss(model, kind, fast, x, y)[0]
                gs = torch.autograd.grad(
                    loss, list(fast.values()), create_graph=not self.first_order
                )
                self._not_twice_differentiable(model, gs)
                g = dict(zip(fast, gs, strict=True))
            loss0 = loss.detach() if loss0 is None else loss0
            if self.first_order:  # FO-MAML: the inner gradient is a constant of θ
                g = {k: v.detach() for k, v in g.items()}
            if self.learn_inner_lr:
                fast = {k: fast[k] - lrs[k] * g[k] for k in fast}
            else:
                fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
        return fast, loss0

    def _not_twice_differentiable(self, model: nn.Module, gs: tuple) -> None:
        if not self.first_order and not any(t.requires_grad for t in gs):
            raise RuntimeError(
                "MAML: the inner gradient came back without a graph, so the meta-gradient would "
                "silently lose its second-order term; the model's attention path "
                f"attn={getattr(getattr(model, 'config', None), 'attn', '?')!r} is not twice "
                "differentiable here. Use attn='theria' or FO-MAML."
            )

    def adapt_batched(
        self, model: nn.Module, kind: str, params: Params, x: Tensor, y: Tensor
    ) -> tuple[Params, Tensor]:
        """(per-task adapted params φ_S, each (T, ...); support losses at θ (T,)) for the
        support sets x (T, K, ...), y (T, K, ...) of T tasks, in one batched computation.
        `params` are θ (and the Meta-SGD rates), shared by the tasks."""
        theta = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
        n = x.shape[0]
        fast, loss0 = per_task(theta, n), None
        for _ in range(self.inner_steps):
            losses, _ = batched_loss(model, kind, fast, x, y)  # (T,)
            # Σ over tasks: each task's weights get that task's gradient (tasks are independent)
            gs = torch.autograd.grad(
                losses.sum(), list(fast.values()), create_graph=not self.first_order
            )
            self._not_twice_differentiable(model, gs)
            loss0 = losses.detach() if loss0 is None else loss0
            g = dict(zip(fast, gs, strict=True))
            if self.first_order:  # FO-MAML: the inner gradient is a constant of θ
                g = {k: v.detach() for k, v in g.items()}
            if self.learn_inner_lr:
                fast = {k: fast[k] - params[LR_PREFIX + k] * g[k] for k in fast}
            else:
                fast = {k: fast[k] - self.inner_lr * g[k] for k in fast}
        assert loss0 is not None
        return fast, loss0

    def _batched(self, model: nn.Module, params: Params, tasks: Episode) -> MetaStepResult:
        kind = tasks.loss
        sx, sy, qx, qy = tasks.tensors()
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            fast, support_loss = self.adapt_batched(model, kind, leaves, sx, sy)
            losses, accs = batched_loss(model, kind, fast, qx, qy)  # (T,)
            gs = torch.autograd.grad(losses.mean(), list(leaves.values()), allow_unused=True)
        grads = {
            k: torch.zeros_like(v) if g is None else g
            for (k, v), g in zip(leaves.items(), gs, strict=True)
        }
        per = {"support_loss_pre": support_loss} | ({} if accs is None else {"query_acc": accs})
        stats = summarize(losses, per)
        return MetaStepResult(stats["query_loss"], grads, stats)

    @calling_thread
    def __call__(self, model: nn.Module, params: Params, tasks: Episode) -> MetaStepResult:
        check_inputs(model, params, tasks)
        if self.learn_inner_lr:
            missing = [k for k, _ in model.named_parameters() if LR_PREFIX + k not in params]
            if missing:
                raise ValueError(
                    f"learn_inner_lr=True but params lacks {LR_PREFIX}{missing[0]} (and "
                    f"{len(missing) - 1} more); build params with init_params(model)"
                )
        batching = resolve_batching(self.batching, model)
        if batching == "batched":
            with second_order_context(model):
                return self._batched(model, params, tasks)
        kind = tasks.loss

        def objective(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            fast, support_loss = self.adapt(model, kind, p, sx, sy, functional=True)
            loss, (detached, aux) = query_loss(model, kind, fast, qx, qy)
            return loss, (detached, aux | {"support_loss_pre": support_loss})

        def autograd_task(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            # The outer gradient through torch.autograd without create_graph: torch.func.grad
            # always differentiates with create_graph=True, which makes theria's attention
            # take its third-order path (O(L·S) memory) at the outermost level. Measured at
            # L=1024: 107 MB (autograd) vs 406 MB (torch.func) peak for one task.
            leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
            with torch.enable_grad():
                fast, support_loss = self.adapt(model, kind, leaves, sx, sy, functional=False)
                loss, (detached, aux) = query_loss(model, kind, fast, qx, qy)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            grads = {
                k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(leaves.items(), gs, strict=True)
            }
            return grads, (detached, aux | {"support_loss_pre": support_loss})

        vmap = batching == "vmap"
        attn = getattr(getattr(model, "config", None), "attn", "")
        if vmap and not self.first_order and str(attn).startswith("theria"):
            warn_once(
                "maml:vmap-memory",
                "MAML(batching='vmap'): torch.func differentiates every level with create_graph, "
                f"so attn={attn!r} runs its third-order path in the meta-gradient (O(L·S) memory, "
                "like the reference); batching='batched' keeps the memory-efficient "
                "second-order pass.",
            )
        task_fn = torch.func.grad(objective, has_aux=True) if vmap else autograd_task
        if self.first_order:
            return run_tasks(task_fn, params, tasks, vmap)
        with second_order_context(model):
            return run_tasks(task_fn, params, tasks, vmap)


def FOMAML(**kwargs) -> MAML:
    """First-order MAML: MAML(first_order=True, ...)."""
    return MAML(first_order=True, **kwargs)
