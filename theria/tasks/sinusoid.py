"""Sinusoid regression, the setup of Finn et al. 2017 (MAML, §5.1): y = A sin(x − φ),
A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5], K-shot support, MSE loss.

Disjoint task families per split: the (A, φ) rectangle is cut into a grid of cells and each
cell is owned by one split (a fixed, seeded assignment: 80% train, 10% val, 10% test of the
cells), so meta-test tasks come from (A, φ) regions never seen in meta-training while each
split still covers the whole rectangle coarsely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from theria.tasks.episode import Episode, Split, check_positive, check_split

_SPLIT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


@dataclass
class SinusoidTasks:
    """Sampler of sinusoid episodes: support_x/y (K, 1), query_x/y (Q, 1), task_info (2,) =
    (amplitude, phase)."""

    k_shot: int = 10
    k_query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    grid: int = 16  # cells per axis of the (A, φ) rectangle for the split assignment
    seed: int = 0  # seeds the cell -> split assignment
    dtype: torch.dtype = torch.float32
    loss = "mse"

    def __post_init__(self) -> None:
        check_positive(k_shot=self.k_shot, k_query=self.k_query, grid=self.grid)
        if self.grid < 4:
            raise ValueError(f"grid must be >= 4 (each split needs cells); got {self.grid}")
        perm = torch.randperm(self.grid**2, generator=torch.Generator().manual_seed(self.seed))
        n_train = round(_SPLIT_FRACTIONS["train"] * self.grid**2)
        n_val = round(_SPLIT_FRACTIONS["val"] * self.grid**2)
        self._cells = {
            "train": perm[:n_train],
            "val": perm[n_train : n_train + n_val],
            "test": perm[n_train + n_val :],
        }

    def split_of(self, amplitude: float, phase: float) -> str:
        """The split that owns the cell of (amplitude, phase)."""
        cell = self._cell(torch.tensor(amplitude), torch.tensor(phase))
        for name, cells in self._cells.items():
            if bool((cells == cell).any()):
                return name
        raise AssertionError("every cell has a split")

    def _cell(self, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        (a0, a1), (p0, p1) = self.amplitude, self.phase
        i = ((a - a0) / (a1 - a0) * self.grid).long().clamp(0, self.grid - 1)
        j = ((p - p0) / (p1 - p0) * self.grid).long().clamp(0, self.grid - 1)
        return i * self.grid + j

    def sample(self, split: Split, n_tasks: int, generator: torch.Generator) -> Episode:
        check_split(split)
        check_positive(n_tasks=n_tasks)
        cells = self._cells[split]
        pick = cells[torch.randint(len(cells), (n_tasks,), generator=generator)]  # (T,)
        u = torch.rand(n_tasks, 2, generator=generator, dtype=torch.float64)  # within the cell
        (a0, a1), (p0, p1) = self.amplitude, self.phase
        amp = a0 + (pick // self.grid + u[:, 0]) / self.grid * (a1 - a0)  # (T,)
        phase = p0 + (pick % self.grid + u[:, 1]) / self.grid * (p1 - p0)  # (T,)
        n = self.k_shot + self.k_query
        x0, x1 = self.x_range
        x = x0 + (x1 - x0) * torch.rand(n_tasks, n, 1, generator=generator, dtype=torch.float64)
        y = amp[:, None, None] * torch.sin(x - phase[:, None, None])  # (T, K+Q, 1)
        x, y = x.to(self.dtype), y.to(self.dtype)
        k = self.k_shot
        info = torch.stack([amp, phase], dim=-1).to(self.dtype)  # (T, 2)
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], info, "mse")
