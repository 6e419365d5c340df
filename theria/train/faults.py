"""Non-finite states: the error the trainer raises, which setting to blame, and the check that
keeps NaN/inf out of parameters and checkpoints.

A meta-step has two places where a step size can blow up: the inner loop (`algo.inner_lr`, the
adaptation on the support set) and the outer step (`optim.lr`, the meta-optimizer). They are told
apart by where the first non-finite value appears:

- the outer step: parameters (or optimizer state) non-finite right after `optimizer.step()`, or a
  support loss that is already non-finite at the meta-parameters, before any adaptation;
- the inner loop: a finite support loss at the meta-parameters, but a non-finite loss or
  meta-gradient after adaptation.

The loop checks the parameters after every outer step (`check_params`), so a non-finite state
never reaches the next step or a checkpoint; `save_checkpoint` checks again (`check_state`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

INNER = (
    "The support loss at the meta-parameters is finite, so the inner loop diverged: lower "
    "algo.inner_lr (or algo.inner_steps; with algo.learn_inner_lr the rates are meta-parameters, "
    "so optim.lr too)"
)
OUTER = (
    "The loss is already non-finite at the meta-parameters, before adaptation: the outer step "
    "diverged; lower optim.lr or set optim.grad_clip"
)
AT_START = (
    "The loss is non-finite at the initial parameters, before any update: not a step-size "
    "problem; check the task, model and dtype settings"
)


class NonFiniteLossError(RuntimeError):
    """The meta-loss, the meta-gradient or the parameters became NaN/inf; the run stopped
    before applying (or saving) it."""


def cause(metrics: Mapping[str, float], first_step: bool) -> str:
    """Which setting to blame for a non-finite meta-loss or meta-gradient, from the step's
    metrics (`support_loss_pre`: the mean support loss at the meta-parameters)."""
    pre = metrics.get("support_loss_pre")
    if pre is not None and math.isfinite(pre):
        return INNER
    return AT_START if first_step else OUTER


def _tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    if isinstance(tree, Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}[{i}]")


def nonfinite(tree: Any) -> list[str]:
    """Names of the floating-point tensors in a (nested) dict/list that hold NaN or inf."""
    return [
        name
        for name, t in _tensors(tree)
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def check_params(params: Mapping[str, Tensor], step: int, total: int) -> None:
    """Raises NonFiniteLossError naming optim.lr when the outer step left a non-finite
    parameter (e.g. Adam with a huge lr: every parameter NaN after the first step). One device
    read when all are finite (it runs after every eager step); names only on failure."""
    floats = [p for p in params.values() if p.is_floating_point()]
    if not floats or bool(torch.stack([torch.isfinite(p).all() for p in floats]).all()):
        return
    bad = nonfinite(params)
    if bad:
        raise NonFiniteLossError(
            f"non-finite parameters {bad[:3]} after the outer step of step {step} of {total}: "
            "stopped before using or saving them; the meta-optimizer's step diverged: lower "
            "optim.lr or set optim.grad_clip"
        )


def check_state(state: Mapping[str, Any]) -> None:
    """A checkpoint holds only finite parameters and optimizer state: raises otherwise."""
    bad = nonfinite({"params": state.get("params", {}), "optimizer": state.get("optimizer", {})})
    if bad:
        raise NonFiniteLossError(
            f"refusing to checkpoint a non-finite state at step {state.get('step')}: {bad[:3]} "
            "hold NaN/inf (the previous checkpoint is kept); lower optim.lr or set "
            "optim.grad_clip"
        )
