"""Omniglot (Lake et al. 2015) few-shot classification, read from the files as distributed.

Sets and where they are looked for under `root` (the first hit wins, per set):

    set name                      zip (read in place, never extracted)   or an unzipped folder
    images_background             <root>/images_background.zip           <root>/images_background/
    images_evaluation             <root>/images_evaluation.zip           <root>/images_evaluation/
    images_background_small1      <root>/images_background_small1.zip    ...
    images_background_small2      <root>/images_background_small2.zip    ...

each also under <root>/omniglot-py/ (torchvision's layout, which `download=True` writes through
`torchvision.datasets.Omniglot`). Inside a zip or folder: `<set>/<alphabet>/<character>/
<id>_<drawer>.png` (in a folder without the leading `<set>/`), 105×105 binary PNGs. The
official counts: background 30 alphabets / 964 characters, evaluation 20 / 659, small1 5 / 136,
small2 5 / 156, 20 drawers each. small1 and small2 share two alphabets (Greek, Latin: 50
characters, byte-identical images): `background="small1+small2"` holds each character once
(8 alphabets, 242 characters), so no character can fall on both sides of a split.

Images: converted to grey, resized from 105 to `image_size` with Lanczos resampling (anti-
aliased; the filter of Finn et al.'s resizing script, github.com/cbfinn/maml,
data/omniglot_resized/resize_images.py), inverted so that ink is 1. Decoded sets are cached
per process (`load_set`): a second sampler over the same files decodes nothing.

Splits (`split`):
    "character"   the pooled background characters, permuted by `split_seed`, cut into
                  train/val/test by `split_fractions` (Vinyals et al. 2016; Finn et al. 2017
                  split characters, not alphabets);
    "alphabet"    whole alphabets permuted by `split_seed` and cut where the character counts
                  first reach the fractions (no alphabet on two sides of a split);
    "evaluation"  train/val from the background characters (fractions[0] : fractions[1]),
                  test = the evaluation set (Lake et al.'s own split: disjoint alphabets).
Rotations (Santoro et al. 2016; Finn et al. 2017 §5.2) act in the sampler
(`FewShotClassification`): each character also exists rotated by 90°, 180°, 270° as three more
classes of the same split, so a split of C characters offers 4C classes.
"""

from __future__ import annotations

import io
import os
import re
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from theria.tasks.classification import FewShotClassification
from theria.tasks.episode import Split, check_split

TORCHVISION_FOLDER = "omniglot-py"
IMAGE_SIDE = 105  # every Omniglot image (and Lake's one-shot runs) is 105×105
SETS = {
    "background": "images_background",
    "evaluation": "images_evaluation",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "full": ("background",),
    "small1": ("small1",),
    "small2": ("small2",),
    "small1+small2": ("small1", "small2"),
}
SPLIT_MODES = ("character", "alphabet", "evaluation")


def preprocess(png: bytes | Path, image_size: int, where: str) -> Tensor:
    """One Omniglot-format PNG (bytes or a path) -> (image_size, image_size) uint8, ink = 255.

    Checks that it decodes and is 105×105 (`where` names the file in the error)."""
    from PIL import Image  # torchvision's dependency; imported where used

    try:
        with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
            im.load()
            if im.size != (IMAGE_SIDE, IMAGE_SIDE):
                raise ValueError(f"size {im.size[0]}×{im.size[1]}")
            grey = im.convert("L")
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for broken files
        raise ValueError(
            f"Omniglot: {where} is not a readable {IMAGE_SIDE}×{IMAGE_SIDE} PNG image ({e})"
        ) from e
    if image_size != IMAGE_SIDE:
        grey = grey.resize((image_size, image_size), Image.LANCZOS)
    data = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8)
    return 255 - data.reshape(image_size, image_size)  # inverted: ink = 255


@dataclass(frozen=True)
class CharacterSet:
    """One decoded Omniglot set: `names[i]` = "alphabet/character", `images[i]` its drawers'
    images, a (n_drawers, S, S) uint8 tensor (ink = 255), sorted by name; `source` the zip
    file or folder it came from."""

    set_name: str
    source: Path
    names: tuple[str, ...]
    images: tuple[Tensor, ...]

    @property
    def alphabets(self) -> list[str]:
        return sorted({n.split("/")[0] for n in self.names})


def locate(root: str | Path, set_name: str) -> Path:
    """The zip file or folder holding `set_name` (e.g. "images_background_small1") under
    `root`, per the module docstring; FileNotFoundError naming every place looked at."""
    root = Path(root)
    tried = []
    for base in (root, root / TORCHVISION_FOLDER):
        for candidate in (base / f"{set_name}.zip", base / set_name):
            tried.append(str(candidate))
            if candidate.is_file() if candidate.suffix == ".zip" else candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        f"Omniglot: {set_name} not found under root={str(root)!r}; looked for "
        + ", ".join(tried)
        + f". Put the official {set_name}.zip (github.com/brendenlake/omniglot, python/) there"
        + (", or pass download=True (torchvision)" if set_name in _TORCHVISION_SETS else "")
    )


_TORCHVISION_SETS = ("images_background", "images_evaluation")
_MEMBER = re.compile(r"^(?:[^/]+/)?([^/]+)/([^/]+)/([^/]+\.png)$")  # [set/]alphabet/char/file


def _read_zip(path: Path, set_name: str, image_size: int) -> dict[str, list[Tensor]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(
            f"Omniglot: {path} is not a readable zip file ({e}); expected the official "
            f"{set_name}.zip"
        ) from e
    chars: dict[str, list[tuple[str, Tensor]]] = {}
    with zf:
        for info in zf.infolist():
            if info.is_dir() or not info.filename.startswith(f"{set_name}/"):
                continue
            m = _MEMBER.match(info.filename)
            if m is None:
                continue
            alphabet, char, file = m.groups()
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError, EOFError) as e:
                raise ValueError(
                    f"Omniglot: {path}: member {info.filename} is corrupt ({e})"
                ) from e
            img = preprocess(data, image_size, f"{path}:{info.filename}")
            chars.setdefault(f"{alphabet}/{char}", []).append((file, img))
    if not chars:
        raise ValueError(
            f"Omniglot: {path} holds no {set_name}/<alphabet>/<character>/<drawer>.png "
            "entries; expected the official zip layout"
        )
    return {k: [img for _, img in sorted(v, key=lambda t: t[0])] for k, v in chars.items()}


def _read_folder(path: Path, set_name: str, image_size: int) -> dict[str, list[Tensor]]:
    chars: dict[str, list[Tensor]] = {}
    for alphabet in sorted(p for p in path.iterdir() if p.is_dir()):
        for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(char.glob("*.png"))
            if files:
                chars[f"{alphabet.name}/{char.name}"] = [
                    preprocess(f, image_size, str(f)) for f in files
                ]
    if not chars:
        raise ValueError(
            f"Omniglot: {path} holds no <alphabet>/<character>/<drawer>.png files; expected "
            f"the unzipped {set_name} folder"
        )
    return chars


_CACHE: dict[tuple, CharacterSet] = {}
_CACHE_LOCK = threading.Lock()
DECODE_COUNT = {"sets": 0}  # sets decoded by this process (the cache's test hook)


def load_set(root: str | Path, name: str, image_size: int = 28) -> CharacterSet:
    """The decoded set `name` ("background", "evaluation", "small1", "small2") found under `root`,
    images at `image_size`. Cached per process on (resolved path, size and mtime of the zip or
    folder, image_size): building several samplers decodes each set once."""
    if name not in SETS:
        raise ValueError(f"Omniglot set must be one of {list(SETS)}; got {name!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1; got {image_size}")
    set_name = SETS[name]
    source = locate(root, set_name).resolve()
    stat = os.stat(source)
    key = (str(source), stat.st_size, stat.st_mtime_ns, image_size)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        read = _read_zip if source.is_file() else _read_folder
        chars = read(source, set_name, image_size)
        names = sorted(chars)
        loaded = CharacterSet(
            set_name, source, tuple(names), tuple(torch.stack(chars[n]) for n in names)
        )
        DECODE_COUNT["sets"] += 1
        _CACHE[key] = loaded
        return loaded


def _pool(sets: Sequence[CharacterSet]) -> tuple[list[str], list[Tensor]]:
    """Characters of several sets, each once (sorted by name). A character in two sets must
    have the same images in both (small1 and small2 share Greek and Latin)."""
    merged: dict[str, tuple[Tensor, Path]] = {}
    for s in sets:
        for name, imgs in zip(s.names, s.images, strict=True):
            if name in merged:
                other, where = merged[name]
                if other.shape != imgs.shape or not torch.equal(other, imgs):
                    raise ValueError(
                        f"Omniglot: character {name} is in both {where} and {s.source} with "
                        "different images; use one background set"
                    )
                continue
            merged[name] = (imgs, s.source)
    names = sorted(merged)
    return names, [merged[n][0] for n in names]


def _cut(n: int, fractions: Sequence[float]) -> tuple[int, int]:
    """Ends of the train and val parts of n items for fractions (train, val, test)."""
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return a, b


def split_indices(
    names: Sequence[str], mode: str, fractions: Sequence[float], seed: int
) -> dict[str, list[int]]:
    """Indices into `names` ("alphabet/character", sorted) of the train/val/test characters
    for split mode "character" or "alphabet" (see the module docstring); each sorted."""
    g = torch.Generator().manual_seed(seed)
    n = len(names)
    if mode == "character":
        perm = torch.randperm(n, generator=g).tolist()
        a, b = _cut(n, fractions)
        parts = {"train": perm[:a], "val": perm[a:b], "test": perm[b:]}
    elif mode == "alphabet":
        alphabets = sorted({x.split("/")[0] for x in names})
        if len(alphabets) < 3:
            raise ValueError(
                f"split='alphabet' needs >= 3 alphabets (one per split); the set has "
                f"{len(alphabets)}: {alphabets}"
            )
        order = [alphabets[i] for i in torch.randperm(len(alphabets), generator=g).tolist()]
        members = {a: [i for i, x in enumerate(names) if x.split("/")[0] == a] for a in order}
        targets = _cut(n, fractions)
        parts = {"train": [], "val": [], "test": []}
        split_names = ["train", "val", "test"]
        s, count = 0, 0
        for j, alpha in enumerate(order):
            left = len(order) - j  # alphabets still to place, this one included
            # move on when this split has reached its share, or when the splits after it
            # would otherwise get no alphabet
            while s < 2 and parts[split_names[s]] and (count >= targets[s] or left <= 2 - s):
                s += 1
            parts[split_names[s]].extend(members[alpha])
            count += len(members[alpha])
    else:
        raise ValueError(f"split mode must be 'character' or 'alphabet' here; got {mode!r}")
    for k, v in parts.items():
        if not v:
            raise ValueError(
                f"split={mode!r} with split_fractions={list(fractions)} leaves split {k!r} "
                f"without characters ({n} characters)"
            )
    return {k: sorted(v) for k, v in parts.items()}


class OmniglotClasses:
    """A class pool (see classification.ClassPool) of Omniglot characters: see the module
    docstring for `background`, `split`, `split_fractions`, `split_seed`. Global class ids
    number the pooled background characters (sorted by name) first, then the evaluation set's
    characters."""

    def __init__(
        self,
        root: str | Path,
        image_size: int = 28,
        background: str = "full",
        split: str = "character",
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
        download: bool = False,
    ) -> None:
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {list(BACKGROUNDS)}; got {background!r}")
        if split not in SPLIT_MODES:
            raise ValueError(f"split must be one of {list(SPLIT_MODES)}; got {split!r}")
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                "split_fractions must be 3 non-negative numbers (train, val, test) summing to "
                f"1; got {list(split_fractions)}"
            )
        if download:
            if background != "full":
                raise ValueError(
                    f"download=True fetches images_background/images_evaluation through "
                    f"torchvision; background={background!r} needs the official "
                    f"{SETS[BACKGROUNDS[background][0]]}.zip placed in root={str(root)!r}"
                )
            import torchvision  # only when asked to download

            for bg in (True, False):
                torchvision.datasets.Omniglot(str(root), background=bg, download=True)
        self.root, self.background, self.split_mode = Path(root), background, split
        self.sets = [load_set(root, s, image_size) for s in BACKGROUNDS[background]]
        names, images = _pool(self.sets)
        self.characters = names  # every pooled background character, sorted
        if split == "evaluation":
            train_frac = fractions[0] / max(fractions[0] + fractions[1], 1e-12)
            perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(split_seed))
            cut = round(train_frac * len(names))
            parts = {"train": sorted(perm[:cut].tolist()), "val": sorted(perm[cut:].tolist())}
            ev = load_set(root, "evaluation", image_size)
            self.sets.append(ev)
            names = names + list(ev.names)
            images = images + list(ev.images)
            parts["test"] = list(range(len(self.characters), len(names)))
            for k in ("train", "val"):
                if not parts[k]:
                    raise ValueError(
                        f"split='evaluation' with split_fractions={list(fractions)} leaves "
                        f"split {k!r} without background characters ({len(self.characters)})"
                    )
        else:
            parts = split_indices(names, split, fractions, split_seed)
        self._names = {s: [names[i] for i in idx] for s, idx in parts.items()}
        self._images = {s: [images[i] for i in idx] for s, idx in parts.items()}
        self._gids = {s: torch.tensor(idx, dtype=torch.long) for s, idx in parts.items()}
        self.image_shape = (1, image_size, image_size)

    @property
    def alphabets(self) -> list[str]:
        """The pooled background alphabets, sorted."""
        return sorted({n.split("/")[0] for n in self.characters})

    def class_names(self, split: Split) -> list[str]:
        """'alphabet/character' of each class of `split`, in class-id order."""
        check_split(split)
        return list(self._names[split])

    def n_classes(self, split: Split) -> int:
        check_split(split)
        return len(self._names[split])

    def n_instances(self, split: Split, cls: int) -> int:
        return self._images[split][cls].shape[0]

    def global_class_ids(self, split: Split) -> Tensor:
        check_split(split)
        return self._gids[split]

    def images(self, split: Split, cls: int, idx: Tensor) -> Tensor:
        """(n, 1, S, S) float32 in [0, 1], ink = 1, of drawers `idx` (n,) of class `cls`."""
        check_split(split)
        return self._images[split][cls][idx][:, None].float() / 255.0


class OmniglotTasks(FewShotClassification):
    """N-way K-shot Omniglot episodes (see the module docstring for sets, splits, layout).
    Shapes as in FewShotClassification: support_x (T, N·K, 1, S, S), support_y (T, N·K),
    query_x (T, N·Q, 1, S, S), query_y (T, N·Q), task_info (T, N) global class ids (×4 +
    rotation when `rotations`)."""

    def __init__(
        self,
        root: str | Path,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        image_size: int = 28,
        background: str = "full",
        split: str = "character",
        split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
        split_seed: int = 0,
        rotations: bool = False,
        max_shift: int = 0,
        download: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        pool = OmniglotClasses(
            root, image_size, background, split, split_fractions, split_seed, download
        )
        super().__init__(pool, n_way, k_shot, k_query, rotations, max_shift, dtype)
