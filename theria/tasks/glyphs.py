"""An offline procedural alphabet: hundreds of glyph classes, many jittered instances each.

Image few-shot learning with no download. Class c is a glyph of 2–4 strokes, each a quadratic
Bézier curve with control points drawn from a generator seeded by (seed, c); instance j of
class c perturbs the control points, applies a small random affine map (rotation, scale,
shear, translation) and a stroke width, all drawn from (seed, c, j), and rasterizes the
strokes as smooth distance-field lines. Everything is a deterministic function of the seed.
Classes are assigned to train/val/test by a seeded permutation (disjoint class sets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from theria.tasks.classification import FewShotClassification
from theria.tasks.episode import Split, check_positive, check_split, split_generator

_CURVE_POINTS = 9  # polyline points per Bézier stroke (8 segments)


class GlyphAlphabet:
    """A class pool (see classification.ClassPool) of procedural glyphs, (1, S, S) images."""

    def __init__(
        self,
        n_classes: int = 1200,
        n_instances: int = 20,
        image_size: int = 28,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        jitter: float = 1.0,
        seed: int = 0,
    ) -> None:
        check_positive(n_classes=n_classes, n_instances=n_instances, image_size=image_size)
        if len(split_fractions) != 3 or abs(sum(split_fractions) - 1.0) > 1e-9:
            raise ValueError(f"split_fractions must be 3 numbers summing to 1; {split_fractions}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0; got {jitter}")
        self.n_instances_, self.size, self.jitter, self.seed = (
            n_instances,
            image_size,
            jitter,
            seed,
        )
        self.image_shape = (1, image_size, image_size)
        perm = torch.randperm(n_classes, generator=split_generator(seed, -1))
        n_train = int(split_fractions[0] * n_classes)
        n_val = int(split_fractions[1] * n_classes)
        self._ids = {
            "train": perm[:n_train],
            "val": perm[n_train : n_train + n_val],
            "test": perm[n_train + n_val :],
        }
        for name, ids in self._ids.items():
            if len(ids) == 0:
                raise ValueError(f"split {name!r} gets no class from n_classes={n_classes}")
        lin = torch.linspace(-1 + 1 / image_size, 1 - 1 / image_size, image_size)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        self._pixels = torch.stack([xx, -yy], dim=-1).reshape(-1, 2)  # (S·S, 2), y up

    def n_classes(self, split: Split) -> int:
        check_split(split)
        return len(self._ids[split])

    def n_instances(self, split: Split, cls: int) -> int:
        return self.n_instances_

    def global_class_ids(self, split: Split) -> Tensor:
        check_split(split)
        return self._ids[split]

    def images(self, split: Split, cls: int, idx: Tensor) -> Tensor:
        check_split(split)
        return self.render(int(self._ids[split][cls]), idx)

    def _strokes(self, glyph: int) -> Tensor:
        g = split_generator(self.seed, glyph)
        n = int(torch.randint(2, 5, (), generator=g))
        return (torch.rand(n, 3, 2, generator=g) * 2 - 1) * 0.7  # (strokes, 3 control pts, xy)

    def render(self, glyph: int, idx: Tensor) -> Tensor:
        """(n, 1, S, S) images of instances `idx` (n,) of glyph `glyph` (a global class id)."""
        ctrl = self._strokes(glyph)  # (P, 3, 2)
        ctrls, affines, shifts, widths = [], [], [], []
        for j in idx.tolist():
            if not 0 <= j < self.n_instances_:
                raise ValueError(f"instance index {j} out of [0, {self.n_instances_})")
            g = split_generator(self.seed, glyph, j + 1)
            s = self.jitter
            ctrls.append(ctrl + 0.05 * s * torch.randn(ctrl.shape, generator=g))
            ang, scl, shear = 0.15 * s * torch.randn(3, generator=g)
            rot = torch.stack([torch.cos(ang), -torch.sin(ang), torch.sin(ang), torch.cos(ang)])
            scale_shear = torch.stack([1 + scl, shear, torch.zeros(()), 1 + scl])
            affines.append(rot.reshape(2, 2) @ scale_shear.reshape(2, 2))  # (2, 2)
            shifts.append(0.08 * s * torch.randn(2, generator=g))
            widths.append(0.07 + 0.02 * torch.rand((), generator=g))
        c = torch.stack(ctrls)  # (n, P, 3, 2)
        t = torch.linspace(0, 1, _CURVE_POINTS)[:, None]  # (T, 1)
        # quadratic Bézier: (1-t)² P0 + 2t(1-t) P1 + t² P2, per stroke
        pts = (
            (1 - t) ** 2 * c[:, :, None, 0]
            + 2 * t * (1 - t) * c[:, :, None, 1]
            + t**2 * c[:, :, None, 2]
        )  # (n, P, T, 2)
        # (n, P, T, 2) @ (n, 1, 2, 2) -> (n, P, T, 2): each instance's affine map
        pts = pts @ torch.stack(affines).mT[:, None] + torch.stack(shifts)[:, None, None]
        n = len(ctrls)
        a = pts[:, :, :-1].reshape(n, -1, 2)  # (n, Sg, 2) segment starts
        b = pts[:, :, 1:].reshape(n, -1, 2)  # (n, Sg, 2) segment ends
        return self._rasterize(a, b, torch.stack(widths))[:, None]  # (n, 1, S, S)

    def _rasterize(self, a: Tensor, b: Tensor, width: Tensor) -> Tensor:
        """Ink of segments a→b (n, Sg, 2) with stroke widths (n,): (n, S, S) in [0, 1]."""
        p = self._pixels[None, :, None]  # (1, S·S, 1, 2)
        a, ab = a[:, None], (b - a)[:, None]  # (n, 1, Sg, 2)
        t = ((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)  # (n, S·S, Sg)
        closest = a + t.clamp(0, 1)[..., None] * ab  # (n, S·S, Sg, 2)
        d = (p - closest).norm(dim=-1).amin(dim=-1)  # (n, S·S) distance to the glyph
        edge = 1.0 / self.size  # about one pixel of soft edge
        ink = ((width[:, None] / 2 - d) / edge + 0.5).clamp(0, 1)
        return ink.reshape(-1, self.size, self.size)


class GlyphTasks(FewShotClassification):
    """N-way K-shot episodes over a procedural `GlyphAlphabet` (no download)."""

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        n_classes: int = 1200,
        n_instances: int = 20,
        image_size: int = 28,
        rotations: bool = False,
        max_shift: int = 0,
        jitter: float = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        pool = GlyphAlphabet(n_classes, n_instances, image_size, jitter=jitter, seed=seed)
        super().__init__(pool, n_way, k_shot, k_query, rotations, max_shift, dtype)
