"""N-way K-shot image classification over a pool of classes, with the usual augmentations.

A *class pool* holds, per split, disjoint sets of classes and their instances (images); the
sampler draws N classes of one split, K + Q distinct instances of each, and relabels the
classes 0..N-1 in a random order (Vinyals et al. 2016; Finn et al. 2017, §5.2). Augmentations:
  rotations  each class c also exists rotated by 90°, 180°, 270° as classes of their own
             (Santoro et al. 2016), so a pool of C classes offers 4C;
  max_shift  each image is translated by up to `max_shift` pixels (zero padding), per image.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from theria.tasks.episode import Episode, Split, check_positive, check_split


class ClassPool(Protocol):
    """Classes of each split and their images; class ids are local to a split."""

    image_shape: tuple[int, int, int]  # (C, H, W)

    def n_classes(self, split: Split) -> int: ...

    def n_instances(self, split: Split, cls: int) -> int: ...

    def images(self, split: Split, cls: int, idx: Tensor) -> Tensor:
        """(n, C, H, W) float images in [0, 1] of instances `idx` (n,) of class `cls`."""
        ...

    def global_class_ids(self, split: Split) -> Tensor:
        """(n_classes(split),) ids unique across splits (to check disjointness)."""
        ...


class FewShotClassification:
    """Sampler of N-way K-shot episodes: support_x (N·K, C, H, W), support_y (N·K,) labels in
    [0, N), query_x (N·Q, C, H, W), query_y (N·Q,), task_info (N,) the global class ids (×4 +
    rotation when `rotations`), in label order."""

    loss = "ce"

    def __init__(
        self,
        pool: ClassPool,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        rotations: bool = False,
        max_shift: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_positive(n_way=n_way, k_shot=k_shot, k_query=k_query)
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0; got {max_shift}")
        self.pool, self.n_way, self.k_shot, self.k_query = pool, n_way, k_shot, k_query
        self.rotations, self.max_shift, self.dtype = rotations, max_shift, dtype
        for split in ("train", "val", "test"):
            n = pool.n_classes(split) * (4 if rotations else 1)  # type: ignore[arg-type]
            if n < n_way:
                raise ValueError(f"n_way={n_way} but split {split!r} has only {n} classes")

    def n_classes(self, split: Split) -> int:
        """Classes episodes of `split` draw from: the pool's, ×4 with `rotations`."""
        check_split(split)
        return self.pool.n_classes(split) * (4 if self.rotations else 1)

    def sample(self, split: Split, n_tasks: int, generator: torch.Generator) -> Episode:
        check_split(split)
        check_positive(n_tasks=n_tasks)
        return Episode.stack([self._one(split, generator) for _ in range(n_tasks)])

    def _one(self, split: Split, g: torch.Generator) -> Episode:
        n_rot = 4 if self.rotations else 1
        n_cls = self.pool.n_classes(split)
        chosen = torch.randperm(n_cls * n_rot, generator=g)[: self.n_way]  # (N,) in label order
        gids = self.pool.global_class_ids(split)
        xs_s, xs_q = [], []
        for c in chosen.tolist():
            cls, rot = divmod(c, n_rot)
            n_inst = self.pool.n_instances(split, cls)
            if n_inst < self.k_shot + self.k_query:
                raise ValueError(
                    f"class {cls} of split {split!r} has {n_inst} instances; k_shot + k_query "
                    f"= {self.k_shot + self.k_query} needed"
                )
            idx = torch.randperm(n_inst, generator=g)[: self.k_shot + self.k_query]
            imgs = self.pool.images(split, cls, idx)  # (K+Q, C, H, W)
            if rot:
                imgs = torch.rot90(imgs, rot, dims=(-2, -1))
            xs_s.append(imgs[: self.k_shot])
            xs_q.append(imgs[self.k_shot :])
        sx, qx = torch.cat(xs_s), torch.cat(xs_q)  # (N·K, C, H, W), (N·Q, C, H, W)
        if self.max_shift:
            sx, qx = self._shift(sx, g), self._shift(qx, g)
        labels = torch.arange(self.n_way)
        sy = labels.repeat_interleave(self.k_shot)  # (N·K,)
        qy = labels.repeat_interleave(self.k_query)  # (N·Q,)
        info = gids[chosen // n_rot] * n_rot + chosen % n_rot  # (N,)
        return Episode(sx.to(self.dtype), sy, qx.to(self.dtype), qy, info, "ce")

    def _shift(self, x: Tensor, g: torch.Generator) -> Tensor:
        s = self.max_shift
        h, w = x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))  # (n, C, H+2s, W+2s)
        off = torch.randint(2 * s + 1, (x.shape[0], 2), generator=g)
        return torch.stack(
            [p[:, i : i + h, j : j + w] for p, (i, j) in zip(padded, off.tolist(), strict=True)]
        )
