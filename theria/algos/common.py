"""What the algorithms share: the result type, the functional loss of a model on a set (one
task, or every task of a meta-batch at once), the ways a meta-batch is run, and the error
translation for attention paths that cannot be differentiated twice.

How a meta-batch of T tasks is run (`batching`):

    batched     one computation for all tasks (default): per-task fast weights carry a leading
                task dim T, the model runs once under `torch.func.vmap` over that dim (so
                attention sees the tasks folded into its batch: one kernel launch per layer),
                and derivatives are plain torch.autograd on the sum of per-task losses (tasks
                are independent, so ∇ of the sum w.r.t. task i's weights is task i's gradient)
    sequential  a Python loop over tasks, one autograd computation each
    vmap        torch.func throughout (grad of grad, vmapped over tasks)
    auto        batched, or sequential for a model that says it does not run under vmap
                (a class attribute `supports_task_vmap = False`)

Metrics stay on the device as 0-d tensors (`MetaStepResult.stats`), so a meta-step has no host
synchronisation and can be captured in a CUDA graph; `MetaStepResult.metrics` reads them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from theria.tasks.episode import Episode, LossKind, task_loss

Params = dict[str, Tensor]
# per task: (params, support_x, support_y, query_x, query_y) -> (grads, (loss, aux metrics))
TaskFn = Callable[..., tuple[Params, tuple[Tensor, dict[str, Tensor]]]]


Batching = Literal["auto", "batched", "sequential", "vmap"]
BATCHINGS: tuple[str, ...] = ("auto", "batched", "sequential", "vmap")


@dataclass
class MetaStepResult:
    """loss: () detached meta-loss (mean query loss over the tasks); grads: the meta-gradient,
    same keys and shapes as the params passed in; stats: 0-d detached tensors on the
    params' device (means over tasks; keys ending in `_max` the maximum), read without a
    host synchronisation; `metrics`: the same as Python floats."""

    loss: Tensor
    grads: Params
    stats: dict[str, Tensor]

    @property
    def metrics(self) -> dict[str, float]:
        """`stats` as floats (reads the device: a synchronisation on CUDA)."""
        return {k: float(v) for k, v in self.stats.items()}


def check_batching(batching: str) -> None:
    if batching not in BATCHINGS:
        raise ValueError(f"batching must be one of {BATCHINGS}; got {batching!r}")


def resolve_batching(batching: str, model: nn.Module) -> str:
    """The way to run the meta-batch: `batching`, with "auto" resolved for `model`."""
    vmappable = getattr(model, "supports_task_vmap", True)
    if batching == "auto":
        return "batched" if vmappable else "sequential"
    if batching in ("batched", "vmap") and not vmappable:
        raise ValueError(
            f"batching={batching!r}: {type(model).__name__} does not run under torch.func.vmap "
            "(supports_task_vmap = False); use batching='sequential' or 'auto'"
        )
    return batching


def per_task(params: Params, n: int) -> Params:
    """Each tensor (...) of `params` as (n, ...): one copy per task (stride-0 views of the same
    storage; autograd gives each task's slice its own gradient)."""
    return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in params.items()}


def batched_loss(
    model: nn.Module, kind: LossKind, params: Params, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Per-task (losses (T,), accuracies (T,) or None) of `model` with per-task params (each
    (T, ...)) on inputs x (T, n, ...) and targets y (T, n, ...): one vmapped forward."""

    def one(p: Params, xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        loss, acc = task_loss(kind, functional_call(model, p, (xi,)), yi)
        return loss, loss.detach() if acc is None else acc

    losses, accs = torch.func.vmap(one)(params, x, y)
    return losses, (accs if kind == "ce" else None)


def summarize(losses: Tensor, per_task_stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-task values (T,) -> 0-d stats: means, and the maximum for keys ending in `_max`."""
    out = {k: (v.max() if k.endswith("_max") else v.mean()).detach() for k, v in
           per_task_stats.items()}  # fmt: skip
    out["query_loss"] = losses.detach().mean()
    return out


def set_loss(
    model: nn.Module, kind: LossKind, params: Params, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor | None]:
    """(mean loss, accuracy or None) of `model` with `params` on inputs x (n, ...), y (n, ...)."""
    return task_loss(kind, functional_call(model, params, (x,)), y)


def query_loss(
    model: nn.Module, kind: LossKind, params: Params, x: Tensor, y: Tensor
) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
    """(loss, (detached loss, {"query_acc": accuracy} for classification, else {})): the
    shape torch.func.grad(..., has_aux=True) takes."""
    loss, acc = set_loss(model, kind, params, x, y)
    return loss, (loss.detach(), {} if acc is None else {"query_acc": acc.detach()})


def check_inputs(model: nn.Module, params: Params, tasks: Episode) -> None:
    if not isinstance(tasks, Episode):
        raise TypeError(f"tasks must be an Episode (batched); got {type(tasks).__name__}")
    shapes = [tuple(t.shape) for t in (*tasks.tensors(), tasks.task_info)]
    if tasks.support_x.dim() < 2 or len({s[:1] for s in shapes}) != 1:
        raise ValueError(
            "tasks must carry a leading task dim T on every tensor (support_x (T, K, ...), ..., "
            f"task_info (T, ...)), as sampler.sample returns; got shapes {shapes}"
        )
    names = dict(model.named_parameters())
    missing = [k for k in names if k not in params]
    if missing:
        raise ValueError(f"params lacks model parameters {missing[:5]}")


def run_tasks(task_fn: TaskFn, params: Params, tasks: Episode, vmap: bool) -> MetaStepResult:
    """Applies `task_fn` to every task (a Python loop, or torch.func.vmap over the task dim)
    and averages gradients, losses and metrics over tasks (`batching` sequential or vmap)."""
    data = tasks.tensors()  # 4 × (T, n, ...)
    n = tasks.n_tasks
    if vmap:
        grads, (losses, aux) = torch.func.vmap(task_fn, in_dims=(None, 0, 0, 0, 0))(params, *data)
        mean_grads = {k: g.mean(0) for k, g in grads.items()}
        metrics = {k: v for k, v in aux.items()}
    else:
        mean_grads = {k: torch.zeros_like(v) for k, v in params.items()}
        loss_list, aux_list = [], []
        for i in range(n):
            g, (loss, aux) = task_fn(params, *(t[i] for t in data))
            for k in mean_grads:
                mean_grads[k] += g[k].detach() / n
            loss_list.append(loss.detach())
            aux_list.append({k: v.detach() for k, v in aux.items()})
        losses = torch.stack(loss_list)
        metrics = {k: torch.stack([a[k] for a in aux_list]) for k in aux_list[0]}
    stats = summarize(losses, metrics)
    return MetaStepResult(
        stats["query_loss"], {k: g.detach() for k, g in mean_grads.items()}, stats
    )


@contextmanager
def second_order_context(model: nn.Module) -> Iterator[None]:
    """Re-raises PyTorch's 'derivative ... not implemented' errors (fused attention kernels
    without double backward or forward AD) with the attention path to use instead."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        low = msg.lower()
        if "not implemented" not in low or not ("derivative" in low or "forward ad" in low):
            raise
        attn = getattr(getattr(model, "config", None), "attn", None)
        where = f"the model's attention path attn={attn!r}" if attn else "the model"
        raise RuntimeError(
            f"the second-order meta-gradient cannot be differentiated through {where}: "
            f"PyTorch's fused SDPA kernels have no double backward / forward-mode derivative. "
            "Use attn='theria' (exact, memory-efficient second derivatives), 'reference' or "
            "'sdpa_math', or a first-order algorithm (FO-MAML). Original error: " + msg
        ) from e
