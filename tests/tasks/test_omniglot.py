"""Omniglot from the distributed zips (read in place) and torchvision's folders: counts,
caching, splits, rotations, episodes and the error messages; on fake data in the official
layout, and on the real minimal background sets when they are present."""

import zipfile

import pytest
import torch

from tests.omniglot_data import make_folder, make_zip, require_omniglot
from theria.tasks import OmniglotTasks
from theria.tasks import omniglot as om
from theria.tasks.omniglot import OmniglotClasses, load_set

SMALL1 = {"Alpha": 3, "Beta": 2, "Shared": 2}
SMALL2 = {"Shared": 2, "Gamma": 3, "Delta": 1}  # "Shared": the same images as in SMALL1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fake_small(tmp_path):
    """images_background_small1.zip / _small2.zip whose "Shared" alphabet is identical."""
    make_zip(tmp_path / "images_background_small1.zip", "images_background_small1", SMALL1)
    # SMALL2 as a zip whose first alphabet "Shared" gets SMALL1's codes for "Shared" (a = 2)
    path = tmp_path / "images_background_small2.zip"
    make_zip(tmp_path / "part_shared.zip", "images_background_small2", {"Shared": 2}, offset=2)
    make_zip(tmp_path / "part_rest.zip", "images_background_small2", {"Gamma": 3, "Delta": 1},
             offset=5)  # fmt: skip
    with zipfile.ZipFile(path, "w") as out:
        for part in ("part_shared.zip", "part_rest.zip"):
            with zipfile.ZipFile(tmp_path / part) as zf:
                for info in zf.infolist():
                    if info.filename not in out.namelist():
                        out.writestr(info, zf.read(info))
            (tmp_path / part).unlink()
    return tmp_path


def test_zip_is_read_in_place_with_sorted_names_and_inverted_images(fake_small):
    before = sorted(p.name for p in fake_small.iterdir())
    s = load_set(fake_small, "small1", image_size=28)
    assert sorted(p.name for p in fake_small.iterdir()) == before  # nothing extracted
    assert s.alphabets == ["Alpha", "Beta", "Shared"] and len(s.names) == 7
    assert s.names[:3] == ("Alpha/character01", "Alpha/character02", "Alpha/character03")
    assert all(t.shape == (4, 28, 28) and t.dtype == torch.uint8 for t in s.images)
    # ink = 255 inside the square (pixels 8..24 of 105 -> about 2.1..6.4 of 28), 0 far away
    img = s.images[0][0]
    assert img[3:6, 3:6].min() > 230 and img[15:, 15:].max() < 10
    full = load_set(fake_small, "small1", image_size=105)
    assert full.images[0].shape == (4, 105, 105)
    assert set(full.images[0].unique().tolist()) == {0, 255}  # binary at full size


def test_torchvision_folder_layout_gives_the_same_characters(tmp_path, fake_small):
    make_folder(tmp_path / "tv" / "omniglot-py" / "images_background_small1", SMALL1)
    a, b = load_set(fake_small, "small1"), load_set(tmp_path / "tv", "small1")
    assert b.source.is_dir() and a.source.suffix == ".zip"
    assert a.names == b.names
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))


def test_images_are_decoded_once_per_process(fake_small):
    n0 = om.DECODE_COUNT["sets"]
    p1 = OmniglotClasses(fake_small, background="small1+small2")
    assert om.DECODE_COUNT["sets"] == n0 + 2
    p2 = OmniglotClasses(fake_small, background="small1+small2", split="alphabet")
    OmniglotTasks(fake_small, n_way=1, background="small1", k_query=2)
    assert om.DECODE_COUNT["sets"] == n0 + 2  # the cache served both
    assert p1.sets[0] is p2.sets[0]
    load_set(fake_small, "small1", image_size=14)  # another size is another entry
    assert om.DECODE_COUNT["sets"] == n0 + 3


def test_union_of_small_sets_holds_shared_characters_once(fake_small):
    pool = OmniglotClasses(fake_small, background="small1+small2")
    assert pool.alphabets == ["Alpha", "Beta", "Delta", "Gamma", "Shared"]
    assert len(pool.characters) == 7 + 6 - 2  # the 2 "Shared" characters once
    assert len(set(pool.characters)) == len(pool.characters)


def test_shared_character_with_different_images_is_refused(tmp_path):
    make_zip(tmp_path / "images_background_small1.zip", "images_background_small1", SMALL1)
    make_zip(tmp_path / "images_background_small2.zip", "images_background_small2", SMALL2,
             offset=7)  # fmt: skip
    with pytest.raises(ValueError, match=r"Shared/character01 is in both .*small1\.zip"):
        OmniglotClasses(tmp_path, background="small1+small2")


@pytest.mark.parametrize("mode", ["character", "alphabet"])
def test_splits_are_disjoint_and_episodes_stay_in_their_split(fake_small, mode):
    # n_way=1: the smallest split of 11 characters may hold a single one
    tasks = OmniglotTasks(fake_small, n_way=1, k_shot=1, k_query=3, background="small1+small2",
                          split=mode, split_fractions=(0.5, 0.25, 0.25))  # fmt: skip
    pool = tasks.pool
    names = {s: set(pool.class_names(s)) for s in ("train", "val", "test")}
    assert sum(map(len, names.values())) == 11 and len(set.union(*names.values())) == 11
    if mode == "alphabet":  # no alphabet on two sides
        alpha = {s: {n.split("/")[0] for n in v} for s, v in names.items()}
        assert not (alpha["train"] & alpha["val"]) and not (alpha["train"] & alpha["test"])
        assert not (alpha["val"] & alpha["test"])
    drawn = {}
    for s in ("train", "val", "test"):
        gids = set(pool.global_class_ids(s).tolist())
        drawn[s] = set(tasks.sample(s, 30, gen(1)).task_info.reshape(-1).tolist())
        assert drawn[s] <= gids
    assert not (drawn["train"] & drawn["test"]) and not (drawn["train"] & drawn["val"])
    # the split is a function of split_seed only
    again = OmniglotClasses(fake_small, background="small1+small2", split=mode,
                            split_fractions=(0.5, 0.25, 0.25))  # fmt: skip
    assert again.class_names("test") == pool.class_names("test")


def test_rotations_multiply_classes_by_four_and_rotate_the_images(fake_small):
    plain = OmniglotTasks(fake_small, n_way=1, k_shot=1, k_query=1, background="small1",
                          split_fractions=(0.5, 0.25, 0.25))  # fmt: skip
    rot = OmniglotTasks(fake_small, n_way=2, k_shot=1, k_query=1, background="small1",
                        split_fractions=(0.5, 0.25, 0.25), rotations=True)  # fmt: skip
    for s in ("train", "val", "test"):
        assert rot.n_classes(s) == 4 * plain.n_classes(s) == 4 * rot.pool.n_classes(s)
    e = rot.sample("train", 40, gen(2))  # (40 tasks, 2 ways)
    info = e.task_info.reshape(-1)
    assert set((info % 4).tolist()) == {0, 1, 2, 3}
    # a rotated class's images are its character's images rotated
    t, j = next((t, j) for t in range(40) for j in range(2) if int(e.task_info[t, j]) % 4 == 1)
    gid = int(e.task_info[t, j]) // 4
    cls = rot.pool.global_class_ids("train").tolist().index(gid)
    originals = rot.pool.images("train", cls, torch.arange(4))  # (4, 1, S, S)
    img = e.support_x[t, j]  # label j, 1 shot
    assert any(torch.equal(img, torch.rot90(o, 1, dims=(-2, -1))) for o in originals)


def test_evaluation_split_tests_on_the_evaluation_set(tmp_path):
    make_zip(tmp_path / "images_background.zip", "images_background", {"A": 3, "B": 3})
    make_folder(tmp_path / "images_evaluation", {"E": 2, "F": 2})
    pool = OmniglotClasses(tmp_path, background="full", split="evaluation",
                           split_fractions=(0.5, 0.5, 0.0))  # fmt: skip
    assert pool.class_names("test") == ["E/character01", "E/character02", "F/character01",
                                        "F/character02"]  # fmt: skip
    assert pool.n_classes("train") == 3 and pool.n_classes("val") == 3
    assert min(pool.global_class_ids("test").tolist()) == 6


def test_missing_set_names_every_path_looked_at(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        OmniglotClasses(tmp_path, background="small2")
    msg = str(e.value)
    assert str(tmp_path / "images_background_small2.zip") in msg
    assert str(tmp_path / "omniglot-py" / "images_background_small2") in msg
    with pytest.raises(FileNotFoundError, match="download=True"):
        OmniglotClasses(tmp_path, background="full")


def test_malformed_files_fail_naming_the_path(tmp_path):
    bad = tmp_path / "images_background_small1.zip"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=rf"{bad}.* not a readable zip"):
        load_set(tmp_path, "small1")
    bad.unlink()
    with zipfile.ZipFile(bad, "w") as zf:  # right names, broken image
        zf.writestr("images_background_small1/A/character01/0001_01.png", b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"small1\.zip:images_background_small1/A/character01/"
                       r"0001_01\.png is not a readable 105×105 PNG"):  # fmt: skip
        load_set(tmp_path, "small1")
    bad.unlink()
    with zipfile.ZipFile(bad, "w") as zf:  # a zip of something else
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ValueError, match="holds no images_background_small1/<alphabet>"):
        load_set(tmp_path, "small1")
    bad.unlink()
    make_folder(tmp_path / "images_background_small1", {"A": 1}, n_drawers=1)
    from PIL import Image

    png = next((tmp_path / "images_background_small1").rglob("*.png"))
    Image.new("L", (64, 64), 255).save(png)  # the wrong size
    with pytest.raises(ValueError, match=rf"{png} is not a readable 105×105 PNG.*64×64"):
        load_set(tmp_path, "small1")


def test_bad_options_are_named(fake_small):
    with pytest.raises(ValueError, match="background must be one of"):
        OmniglotClasses(fake_small, background="small3")
    with pytest.raises(ValueError, match="split must be one of"):
        OmniglotClasses(fake_small, background="small1", split="drawer")
    with pytest.raises(ValueError, match="split_fractions"):
        OmniglotClasses(fake_small, background="small1", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="leaves split 'val' without characters"):
        OmniglotClasses(fake_small, background="small1", split_fractions=(0.9, 0.0, 0.1))
    with pytest.raises(ValueError, match="download=True"):
        OmniglotClasses(fake_small, background="small1", download=True)
    with pytest.raises(ValueError, match="n_way=30"):
        OmniglotTasks(fake_small, n_way=30, background="small1")


# --- the real minimal background sets (skipped without them) -------------------------------


def test_real_minimal_sets_have_the_official_counts():
    root = require_omniglot()
    for name, n_alpha, n_chars in (("small1", 5, 136), ("small2", 5, 156)):
        s = load_set(root, name)
        assert s.source.name == f"images_background_{name}.zip"
        assert (len(s.alphabets), len(s.names)) == (n_alpha, n_chars)
        assert {t.shape for t in s.images} == {(20, 28, 28)}  # 20 drawers each
    pool = OmniglotClasses(root, background="small1+small2")
    # Greek (24) and Latin (26) are in both zips, byte-identical: 136 + 156 - 50 characters
    assert len(pool.alphabets) == 8 and len(pool.characters) == 242
    assert sum(pool.n_classes(s) for s in ("train", "val", "test")) == 242


def test_real_episodes_disjoint_between_splits_and_rotations_times_four():
    root = require_omniglot()
    tasks = OmniglotTasks(root, n_way=20, k_shot=1, k_query=5, background="small1+small2",
                          rotations=True)  # fmt: skip
    sizes = [tasks.pool.n_classes(s) for s in ("train", "val", "test")]
    assert sizes == [145, 48, 49]  # split_fractions (0.6, 0.2, 0.2) of 242
    assert [tasks.n_classes(s) for s in ("train", "val", "test")] == [4 * n for n in sizes]
    e = tasks.sample("test", 2, gen(3))
    assert e.support_x.shape == (2, 20, 1, 28, 28) and e.query_x.shape == (2, 100, 1, 28, 28)
    assert e.support_y[0].tolist() == list(range(20))
    assert e.support_x.min() >= 0 and e.support_x.max() == 1
    ink = e.support_x.mean((-1, -2, -3))  # strokes cover a few % to ~25 % of the image
    assert (ink > 0.01).all() and (ink < 0.4).all()
    drawn = {
        s: {int(g) // 4 for g in tasks.sample(s, 20, gen(4)).task_info.reshape(-1)}
        for s in ("train", "val", "test")
    }
    assert not (drawn["train"] & drawn["test"]) and not (drawn["train"] & drawn["val"])
    assert not (drawn["val"] & drawn["test"])
