"""theria.report: a sweep's results.json files become a table (mean ± CI over seeds) and a
plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from theria.report import main, report, setting_of
from theria.train.evaluate import t_quantile_975


def fake_run(
    root: Path,
    job: int,
    algo: str,
    seed: int,
    loss: float,
    name: str = "sweep",
    steps: int = 10,
    **extra,
) -> None:
    d = root / str(job)
    d.mkdir(parents=True)
    stat = {"mean": loss, "ci95": 0.1, "std": 1.0, "n": 100}
    run = {
        "overrides": [f"algo={algo}", f"seed={seed}", "launcher=joblib"],
        "config": {
            "algo": {"name": algo},
            "attn": {"name": "theria"},
            "task": {"name": "x"},
            "seed": seed,
        },
        "steps": steps,
        "name": name,
        "test": {"query_loss_post": stat, "query_loss_pre": stat},
        "val_history": [
            {"step": 5, "query_loss_post": loss + 1},
            {"step": 10, "query_loss_post": loss},
        ],
        "train_time_s": 2.0,
    } | extra
    (d / "results.json").write_text(json.dumps(run))


def test_report_groups_seeds_and_writes_table_and_plot(tmp_path: Path, capsys) -> None:
    losses = {"maml": [1.0, 2.0, 3.0], "fomaml": [4.0, 4.0, 7.0]}
    job = 0
    for algo, values in losses.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path, job, algo, seed, v)
            job += 1
    md = report(tmp_path)
    text = md.read_text()
    ci = t_quantile_975(2) * 1.0 / math.sqrt(3)  # maml: mean 2, sample std 1
    assert f"| `algo=maml` | 3 | 2 ± {ci:.2g} |" in text
    assert "| `algo=fomaml` | 3 | 5 ± " in text
    assert (tmp_path / "report.png").stat().st_size > 1000
    main([str(tmp_path)])
    assert "written:" in capsys.readouterr().out


def test_report_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no results\.json"):
        report(tmp_path)
    fake_run(tmp_path, 0, "maml", 0, 1.0)
    with pytest.raises(ValueError, match="query_acc_post"):
        report(tmp_path, metric="query_acc_post")


def test_setting_without_overrides_uses_the_config() -> None:
    run = {"overrides": ["seed=3"], "config": {"algo": {"name": "imaml"},
           "attn": {"name": "reference"}, "task": {"name": "markov"}}}  # fmt: skip
    assert setting_of(run) == "algo=imaml attn=reference task=markov"


def test_report_counts_distinct_seeds_titles_mixed_folders_and_adds_columns(tmp_path: Path) -> None:
    fake_run(tmp_path, 0, "maml", 0, 1.0, peak_mem_mb=12.5, sanity_max={"hvp_rev_vs_fd": 3e-9})
    fake_run(tmp_path, 1, "maml", 0, 1.2, peak_mem_mb=14.0)  # the same seed, run again
    fake_run(tmp_path, 2, "maml", 1, 1.1, name="other", steps=20)
    text = report(tmp_path).read_text()
    assert text.startswith("# mixed folder (other, sweep): 3 runs, 10–20 meta-training steps")
    assert "| seeds |" in text and "peak MB | sanity max |" in text
    row = next(x for x in text.splitlines() if x.startswith("| `algo=maml"))
    assert "| 2 (3 runs) |" in row and "| 14 | 3.0e-09 |" in row


def test_report_bars_take_their_curves_colours(tmp_path: Path, monkeypatch) -> None:
    import matplotlib.axes

    for job, algo in enumerate(("fomaml", "maml", "imaml")):
        fake_run(tmp_path, job, algo, 0, 1.0 + job)
    seen: dict[str, list] = {"bars": [], "lines": []}
    real_barh, real_plot = matplotlib.axes.Axes.barh, matplotlib.axes.Axes.plot

    def barh(self, *a, **k):
        seen["bars"] = list(k["color"])
        return real_barh(self, *a, **k)

    def plot(self, *a, **k):
        seen["lines"].append(k["color"])
        return real_plot(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "barh", barh)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", plot)
    report(tmp_path)
    assert seen["bars"] == seen["lines"] and len(set(seen["bars"])) == 3
