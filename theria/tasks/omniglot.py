"""Omniglot (Lake et al. 2015) few-shot classification, in torchvision's layout.

    <data_dir>/omniglot-py/images_background/<alphabet>/<character>/<drawer>.png   (964 chars)
    <data_dir>/omniglot-py/images_evaluation/<alphabet>/<character>/<drawer>.png   (659 chars)

Downloading goes through `torchvision.datasets.Omniglot(download=True)` and happens only when
asked (`download=True`). Loading reads the extracted folders directly (torchvision's dataset
class insists on the downloaded zip files being present and checks their md5; the folders are
what matters), sorted, so class ids are stable. Splits: meta-train = the background
characters except the last `n_val_classes`, meta-val = those, meta-test = the evaluation set
(disjoint characters and alphabets from meta-train). Images are resized to `image_size`
(28 as in Vinyals et al. 2016 / Finn et al. 2017) and inverted so that ink is 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from theria.tasks.classification import FewShotClassification
from theria.tasks.episode import Split, check_split

FOLDER = "omniglot-py"
_SETS = {"background": "images_background", "evaluation": "images_evaluation"}


def _load_set(root: Path, image_size: int) -> tuple[list[str], list[Tensor]]:
    """(character names, per character a (n, 1, S, S) tensor), sorted by alphabet/character."""
    from PIL import Image  # torchvision's dependency; imported where used

    names, images = [], []
    for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
        for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(char.glob("*.png"))
            if not files:
                continue
            imgs = []
            for f in files:
                with Image.open(f) as im:
                    im = im.convert("L").resize((image_size, image_size), Image.BILINEAR)
                    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                    imgs.append(data.reshape(1, image_size, image_size))
            names.append(f"{alphabet.name}/{char.name}")
            images.append(1.0 - torch.stack(imgs).float() / 255.0)  # (n, 1, S, S), ink = 1
    return names, images


class OmniglotClasses:
    """A class pool (see classification.ClassPool) of Omniglot characters."""

    def __init__(
        self,
        data_dir: str | Path,
        image_size: int = 28,
        n_val_classes: int = 100,
        download: bool = False,
    ) -> None:
        root = Path(data_dir) / FOLDER
        if download:
            import torchvision  # only when asked to download

            for background in (True, False):
                torchvision.datasets.Omniglot(str(data_dir), background=background, download=True)
        sets = {}
        for key, sub in _SETS.items():
            path = root / sub
            if not path.is_dir():
                raise FileNotFoundError(
                    f"Omniglot: {path} not found; pass download=True to fetch it with "
                    f"torchvision, or point data_dir at a folder holding {FOLDER}/{sub}"
                )
            sets[key] = _load_set(path, image_size)
        bg_names, bg_imgs = sets["background"]
        if not 0 < n_val_classes < len(bg_names):
            raise ValueError(
                f"n_val_classes must be in (0, {len(bg_names)}) (background characters); "
                f"got {n_val_classes}"
            )
        cut = len(bg_names) - n_val_classes
        ev_names, ev_imgs = sets["evaluation"]
        if not ev_names:
            raise ValueError(f"Omniglot: no character images under {root / _SETS['evaluation']}")
        self._classes = {
            "train": (bg_names[:cut], bg_imgs[:cut]),
            "val": (bg_names[cut:], bg_imgs[cut:]),
            "test": (ev_names, ev_imgs),
        }
        offsets = {"train": 0, "val": cut, "test": len(bg_names)}
        self._gids = {s: offsets[s] + torch.arange(len(self._classes[s][0])) for s in self._classes}
        self.image_shape = (1, image_size, image_size)

    def class_names(self, split: Split) -> list[str]:
        """'alphabet/character' of each class of `split`, in class-id order."""
        check_split(split)
        return list(self._classes[split][0])

    def n_classes(self, split: Split) -> int:
        check_split(split)
        return len(self._classes[split][0])

    def n_instances(self, split: Split, cls: int) -> int:
        return self._classes[split][1][cls].shape[0]

    def global_class_ids(self, split: Split) -> Tensor:
        check_split(split)
        return self._gids[split]

    def images(self, split: Split, cls: int, idx: Tensor) -> Tensor:
        check_split(split)
        return self._classes[split][1][cls][idx]


class OmniglotTasks(FewShotClassification):
    """N-way K-shot Omniglot episodes (see the module docstring for splits and layout)."""

    def __init__(
        self,
        data_dir: str | Path,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        image_size: int = 28,
        rotations: bool = True,
        max_shift: int = 0,
        n_val_classes: int = 100,
        download: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        pool = OmniglotClasses(data_dir, image_size, n_val_classes, download)
        super().__init__(pool, n_way, k_shot, k_query, rotations, max_shift, dtype)
