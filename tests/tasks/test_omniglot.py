"""Omniglot loading on a tiny dataset generated in torchvision's folder layout (no download)."""

import pytest
import torch
from PIL import Image

from theria.tasks import OmniglotTasks
from theria.tasks.omniglot import OmniglotClasses


def make_fake_omniglot(root, n_alphabets=2, n_chars=3, n_drawers=4):
    """omniglot-py/images_{background,evaluation}/<alphabet>/<character>/<drawer>.png, black
    ink on white, 105×105 like the real images. Character c of alphabet a has a black square
    whose position encodes (a, c); the drawers' copies differ by a one-pixel shift."""
    for sub in ("images_background", "images_evaluation"):
        for a in range(n_alphabets):
            for c in range(n_chars):
                d = root / "omniglot-py" / sub / f"Alphabet_{a}" / f"character{c + 1:02d}"
                d.mkdir(parents=True)
                for k in range(n_drawers):
                    img = Image.new("L", (105, 105), 255)
                    x0, y0 = 10 + 30 * c + k % 2, 10 + 45 * a
                    img.paste(0, (x0, y0, x0 + 20, y0 + 20))
                    img.save(d / f"{a:02d}{c:02d}_{k + 1:02d}.png")


def test_loads_real_folder_layout(tmp_path):
    make_fake_omniglot(tmp_path)
    pool = OmniglotClasses(tmp_path, image_size=28, n_val_classes=2)
    assert (pool.n_classes("train"), pool.n_classes("val"), pool.n_classes("test")) == (4, 2, 6)
    assert pool.class_names("train")[0] == "Alphabet_0/character01"
    assert pool.class_names("val") == ["Alphabet_1/character02", "Alphabet_1/character03"]
    imgs = pool.images("train", 0, torch.arange(4))
    assert imgs.shape == (4, 1, 28, 28) and imgs.dtype == torch.float32
    # inverted: ink = 1 inside the square (pixels 10..30 of 105 -> about 2.7..8 of 28)
    assert imgs[:, 0, 4:7, 4:7].min() > 0.9 and imgs[:, 0, 20:, 20:].max() < 0.1
    ids = [set(pool.global_class_ids(s).tolist()) for s in ("train", "val", "test")]
    assert len(set.union(*ids)) == 12


def test_episodes_from_fake_omniglot(tmp_path):
    make_fake_omniglot(tmp_path)
    tasks = OmniglotTasks(tmp_path, n_way=3, k_shot=1, k_query=2, n_val_classes=2)
    e = tasks.sample("test", 2, torch.Generator().manual_seed(0))
    assert e.support_x.shape == (2, 3, 1, 28, 28) and e.query_y.shape == (2, 6)
    assert e.task_info.min() >= 6  # evaluation classes follow the background ones
    rot = OmniglotTasks(tmp_path, n_way=3, k_shot=1, k_query=2, n_val_classes=2, rotations=True)
    assert rot.pool.n_classes("train") == 4  # rotations act in the sampler: 16 classes drawn


def test_missing_data_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        OmniglotClasses(tmp_path)
