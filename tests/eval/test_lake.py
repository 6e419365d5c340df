"""Lake et al.'s one-shot runs: a fixture in the exact distributed format (all_runs.zip and
its run01..run20 folders), parsing, errors naming the path, and a trained run evaluated."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from tests.omniglot_data import glyph_png
from theria.eval import evaluate_lake, load_lake_runs
from theria.eval.__main__ import main
from theria.eval.lake import wilson_ci95
from theria.train import compose_config, train
from theria.train.build import build_algo, build_model, check_config
from theria.train.evaluate import adapt


def make_lake_runs(root, seed: int = 0):
    """root/run01..run20 in Lake's layout; item k of run r shows class perm_r[k] drawn by a
    second drawer (glyph_png's one-pixel shift). Returns {run: 0-based class of each item}."""
    g = torch.Generator().manual_seed(seed)
    truth = {}
    for r in range(1, 21):
        run = f"run{r:02d}"
        (root / run / "training").mkdir(parents=True)
        (root / run / "test").mkdir()
        perm = torch.randperm(20, generator=g).tolist()
        for c in range(20):
            (root / run / "training" / f"class{c + 1:02d}.png").write_bytes(
                glyph_png(c // 4 + r, c % 4, 0)
            )
        lines = []
        for k, c in enumerate(perm):
            (root / run / "test" / f"item{k + 1:02d}.png").write_bytes(
                glyph_png(c // 4 + r, c % 4, 1)
            )
            lines.append(f"{run}/test/item{k + 1:02d}.png {run}/training/class{c + 1:02d}.png")
        (root / run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        truth[run] = perm
    return truth


def zip_runs(folder, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, f.relative_to(folder).as_posix())
    return path


@pytest.fixture
def lake_dir(tmp_path):
    d = tmp_path / "lake"
    truth = make_lake_runs(d)
    return d, truth


def test_folders_and_all_runs_zip_load_the_same_runs(lake_dir, tmp_path):
    d, truth = lake_dir
    runs = load_lake_runs(d, image_size=28)
    assert [r.name for r in runs] == [f"run{r:02d}" for r in range(1, 21)]
    assert runs[0].train.shape == (20, 1, 28, 28) and runs[0].test.shape == (20, 1, 28, 28)
    assert all(r.labels.tolist() == truth[r.name] for r in runs)
    assert runs[0].train.max() == 1 and runs[0].train.min() == 0  # ink = 1
    z = zip_runs(d, tmp_path / "zipped" / "all_runs.zip")
    for source in (z, z.parent):  # the zip, or a folder holding it
        again = load_lake_runs(source, image_size=28)
        assert all(torch.equal(a.test, b.test) and torch.equal(a.labels, b.labels)
                   for a, b in zip(runs, again, strict=True))  # fmt: skip


def test_missing_or_malformed_files_name_the_path(lake_dir, tmp_path):
    d, _ = lake_dir
    (d / "run07" / "class_labels.txt").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{d / 'run07' / 'class_labels.txt'} not found: "
                       rf"run folder {d / 'run07'} has no class_labels.txt"):  # fmt: skip
        load_lake_runs(d)
    (d / "run07" / "class_labels.txt").write_text("run07/test/item01.png run07/class01.png\n")
    with pytest.raises(ValueError, match=rf"{d / 'run07' / 'class_labels.txt'} line 1: expected"):
        load_lake_runs(d)
    lines = [f"run07/test/item{k:02d}.png run07/training/class01.png" for k in range(1, 20)]
    (d / "run07" / "class_labels.txt").write_text("\n".join(lines))
    with pytest.raises(
        ValueError, match=r"lists 19 test items, expected 20 \(missing items \[20\]"
    ):
        load_lake_runs(d)
    shutil.rmtree(d / "run07")
    with pytest.raises(FileNotFoundError, match=r"lacks the run folders \['run07'\]"):
        load_lake_runs(d)
    (d / "run03" / "test" / "item05.png").unlink()
    (d / "run03" / "test" / "item05.png").write_bytes(b"garbage")
    make_lake_runs(tmp_path / "fresh")
    (tmp_path / "fresh" / "run03" / "test" / "item05.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"run03/test/item05\.png is not a readable 105×105 PNG"):
        load_lake_runs(tmp_path / "fresh")
    z = zip_runs(tmp_path / "fresh", tmp_path / "all_runs.zip")
    with pytest.raises(ValueError, match=rf"{z}:run03/test/item05\.png is not a readable"):
        load_lake_runs(z)
    bad = tmp_path / "bad" / "all_runs.zip"
    bad.parent.mkdir()
    bad.write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=rf"{bad} is not a readable zip file"):
        load_lake_runs(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_lake_runs(tmp_path / "nowhere")


def test_wilson_interval():
    lo, hi = wilson_ci95(40, 400)
    assert lo < 0.1 < hi and abs(lo - 0.0743) < 1e-3 and abs(hi - 0.1332) < 1e-3
    assert abs(wilson_ci95(0, 400)[0]) < 1e-12 and wilson_ci95(0, 400)[1] < 0.01


@pytest.fixture
def trained_20way(tmp_path):
    """A 20-way conv4 run (procedural glyphs: no files needed) of a few MAML steps."""
    cfg = compose_config([
        "task=glyphs", "model=conv4", "algo=maml", "debug=fast", "logger=none", "task.n_way=20",
        "task.n_classes=100", "task.rotations=true", "model.channels=8", "algo.inner_lr=0.1",
        "algo.eval_inner_steps=2", "threads=1",
    ])  # fmt: skip
    train(cfg, run_dir=tmp_path / "run")
    return tmp_path / "run"


def test_trained_run_is_evaluated_with_its_own_inner_loop(lake_dir, trained_20way, tmp_path):
    d, _ = lake_dir
    res = evaluate_lake(trained_20way, d)
    assert res["trials"] == 400 and len(res["per_run"]) == 20
    assert res["error_rate"] == pytest.approx(sum(res["per_run"].values()) / 20)
    assert res["ci95"][0] <= res["error_rate"] <= res["ci95"][1]
    # an independent recount: the run's config and checkpoint, adapt, argmax on the items
    state = torch.load(trained_20way / "checkpoints" / "last.pt", weights_only=False)
    cfg = check_config(OmegaConf.create(state["config"]))
    model, algo = build_model(cfg), build_algo(cfg)
    wrong = 0
    for run in load_lake_runs(d):
        phi = adapt(algo, model, "ce", state["params"], run.train, torch.arange(20), 2)
        pred = functional_call(model, phi, (run.test,)).argmax(-1)
        wrong += int((pred != run.labels).sum())
    assert res["errors"] == wrong
    # the CLI writes the JSON and prints the rate
    out = tmp_path / "lake.json"
    assert main(["lake", "--runs", str(d), "--run", str(trained_20way), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["errors"] == wrong


def test_cli_errors_name_the_problem(lake_dir, tmp_path, capsys):
    d, _ = lake_dir
    assert main(["lake", "--runs", str(d), "--run", str(tmp_path / "norun")]) == 2
    assert f"no checkpoint at {tmp_path / 'norun' / 'checkpoints' / 'last.pt'}" in (
        capsys.readouterr().err)  # fmt: skip
    cfg = compose_config(["task=glyphs", "model=conv4", "debug=fast", "logger=none",
                          "task.n_classes=60", "model.channels=4", "threads=1"])  # fmt: skip
    train(cfg, run_dir=tmp_path / "five")
    assert main(["lake", "--runs", str(d), "--run", str(tmp_path / "five")]) == 2
    assert "trained with task.n_way=5" in capsys.readouterr().err
