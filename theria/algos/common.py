"""What the algorithms share: the result type, the functional loss of a model on a set, the
per-task loop (sequential or vmap) and the error translation for attention paths that cannot
be differentiated twice."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call

from theria.tasks.episode import Episode, LossKind, task_loss

Params = dict[str, Tensor]
# per task: (params, support_x, support_y, query_x, query_y) -> (grads, (loss, aux metrics))
TaskFn = Callable[..., tuple[Params, tuple[Tensor, dict[str, Tensor]]]]


@dataclass
class MetaStepResult:
    """loss: () detached meta-loss (mean query loss over the tasks); grads: the meta-gradient,
    same keys and shapes as the params passed in; metrics: floats for logging."""

    loss: Tensor
    grads: Params
    metrics: dict[str, float]


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
    and averages gradients, losses and metrics over tasks."""
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
    out = {k: float(v.max() if k.endswith("_max") else v.mean()) for k, v in metrics.items()}
    meta_loss = losses.detach().mean()
    out["query_loss"] = float(meta_loss)
    return MetaStepResult(meta_loss, {k: g.detach() for k, g in mean_grads.items()}, out)


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
