"""Episodes (support + query sets), task-sampler protocol, split handling and task losses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")
LossKind = Literal["mse", "ce"]


@dataclass(frozen=True)
class Episode:
    """One task (or a batch of tasks stacked on a leading dim T).

    Shapes, per task (prefix (T,) for a batch):
        support_x: (K, ...) inputs, support_y: (K, ...) targets
        query_x:   (Q, ...) inputs, query_y:   (Q, ...) targets
        task_info: (...) what identifies the task (sinusoid: (amplitude, phase); Markov chain:
                   the task id; classification: the N class ids); for tests and logging.
    `loss` says how predictions meet targets: "mse" (regression, targets like predictions)
    or "ce" (classification; integer targets, logits with one more trailing dim).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_info: Tensor
    loss: LossKind

    @property
    def n_tasks(self) -> int:
        """T of a batch (the leading dim)."""
        return self.support_x.shape[0]

    def task(self, i: int) -> Episode:
        """Task i of a batch, without the leading dim."""
        return self._map(lambda t: t[i])

    def to(
        self,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        non_blocking: bool = False,
        pin: bool = False,
    ):
        """Moves tensors; `dtype` applies to floating-point inputs/targets only. `pin` stages
        CPU tensors in pinned memory first, so that `non_blocking` copies to CUDA do not wait
        for the device (the host can prepare the next batch while the GPU computes)."""

        def move(t: Tensor) -> Tensor:
            if pin and t.device.type == "cpu":
                t = t.pin_memory()
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return t.to(device=device, non_blocking=non_blocking)

        return self._map(move)

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(support_x, support_y, query_x, query_y), e.g. to pass through torch.func.vmap."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def _map(self, fn) -> Episode:
        fields = {
            f.name: fn(getattr(self, f.name)) if f.name != "loss" else self.loss
            for f in dataclasses.fields(self)
        }
        return Episode(**fields)

    @staticmethod
    def stack(episodes: list[Episode]) -> Episode:
        """Stacks single-task episodes of equal shapes on a new leading task dim."""
        if not episodes:
            raise ValueError("Episode.stack: episodes is empty")
        kinds = {e.loss for e in episodes}
        if len(kinds) != 1:
            raise ValueError(f"Episode.stack: mixed loss kinds {sorted(kinds)}")
        for f in ("support_x", "support_y", "query_x", "query_y", "task_info"):
            shapes = [tuple(getattr(e, f).shape) for e in episodes]
            if len(set(shapes)) != 1:
                raise ValueError(
                    f"Episode.stack: the tasks' {f} differ in shape ({shapes}); a meta-batch "
                    "is one batched computation, so its tasks need equal shapes (sample them "
                    "with equal k_shot / k_query / lengths, or pad them yourself with a mask)"
                )
        return Episode(
            *(
                torch.stack([getattr(e, f) for e in episodes])
                for f in ("support_x", "support_y", "query_x", "query_y", "task_info")
            ),
            loss=episodes[0].loss,
        )


class TaskSampler(Protocol):
    """What every sampler offers. `sample` draws `n_tasks` episodes of `split`, stacked on a
    leading dim, deterministically from `generator` (same generator state -> same episodes)."""

    loss: LossKind

    def sample(self, split: Split, n_tasks: int, generator: torch.Generator) -> Episode: ...


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")


def check_positive(**kwargs: int | float) -> None:
    for name, value in kwargs.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0; got {value!r}")


def task_loss(kind: LossKind, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
    """(mean loss, accuracy or None) of predictions against targets.

    mse: pred and target of equal shape. ce: pred (..., C) logits, target (...) class ids;
    accuracy is the fraction of argmax hits (no gradient).
    """
    if kind == "mse":
        if pred.shape != target.shape:
            raise ValueError(
                f"mse loss: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        # written out: F.mse_loss's forward-over-reverse derivative fails under vmap on torch
        # 2.14 ("ZeroTensors are immutable"), which vmapped iMAML with hvp="fwd_rev" needs
        return (pred - target).square().mean(), None
    if kind == "ce":
        if pred.shape[:-1] != target.shape:
            raise ValueError(
                f"ce loss: pred (..., C) of shape {tuple(pred.shape)} does not match target "
                f"(...) of shape {tuple(target.shape)}"
            )
        logits = pred.reshape(-1, pred.shape[-1])  # (..., C) -> (N, C)
        labels = target.reshape(-1)  # (...) -> (N,)
        acc = (logits.detach().argmax(-1) == labels).to(logits.dtype).mean()
        return F.cross_entropy(logits, labels), acc
    raise ValueError(f"loss kind must be 'mse' or 'ce'; got {kind!r}")


def split_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *keys): deterministic per task / class / instance."""
    h = seed & 0xFFFFFFFF
    for k in keys:  # a small integer mix (splitmix-like); distinct tuples give distinct seeds
        h = (h * 0x9E3779B1 + (k & 0xFFFFFFFF) + 0x7F4A7C15) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)
