"""A multirun sweep through the joblib launcher, then `python -m theria.report` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_joblib_sweep_then_report(tmp_path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "theria.train", "-m", "debug=fast", "logger=none",
         "model.hidden=[8]", "algo=fomaml,maml", "seed=0,1", "launcher=joblib",
         f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = sorted(sweep.glob("*/results.json"))
    assert len(jobs) == 4
    assert not list(sweep.glob("**/*.log"))  # no empty __main__.log per job (job_logging)
    assert {tuple(json.loads(j.read_text())["overrides"][:2]) for j in jobs} >= {
        ("debug=fast", "logger=none")
    }
    rep = subprocess.run([sys.executable, "-m", "theria.report", str(sweep)],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (sweep / "report.md").read_text()
    assert "| `algo=fomaml` | 2 |" in md and "| `algo=maml` | 2 |" in md
    assert (sweep / "report.png").exists()
