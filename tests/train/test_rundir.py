"""Issue 17: run directories that two runs cannot share. Names carry the launching process's
id (two runs or sweeps of one name started in the same second get distinct folders), and every
run claims its folder before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import theria
from theria.train import CONF_DIR, compose_config, train
from theria.train.rundir import CLAIM, RunDirInUseError, claim, default_run_dir

FAST = ["debug=fast", "task.k_shot=5", "task.k_query=5", "model.hidden=[8]", "sanity_every=0",
        "eval_every=0", "logger=none", "steps=2"]  # fmt: skip


@pytest.fixture
def sleeper():
    """A live process that is not this one: the owner of someone else's run."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p
    p.kill()
    p.wait()


def _claim_for(run_dir: Path, host: str, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CLAIM).write_text(f"{host} {pid}\n")


def test_names_end_in_the_run_id() -> None:
    hydra = OmegaConf.load(CONF_DIR / "config.yaml").hydra
    for d in (hydra.run._get_node("dir")._value(), hydra.sweep._get_node("dir")._value()):
        assert d.endswith("_${oc.env:THERIA_RUN_ID,0}"), d
    a, b = default_run_dir("x"), default_run_dir("x")
    assert a != b and a.parent == b.parent == Path("outputs/x")


def test_a_live_owner_keeps_its_directory(tmp_path, sleeper) -> None:
    _claim_for(tmp_path, socket.gethostname(), sleeper.pid)
    with pytest.raises(RunDirInUseError, match=rf"belongs to another run: process {sleeper.pid}"):
        claim(tmp_path)
    with pytest.raises(RunDirInUseError):  # resuming does not make two writers acceptable
        claim(tmp_path, resume=True)
    sleeper.kill()
    sleeper.wait()
    claim(tmp_path)  # its process is gone: taken over
    assert (tmp_path / CLAIM).read_text().split() == [socket.gethostname(), str(os.getpid())]


def test_another_hosts_claim_is_refused_unless_resuming(tmp_path) -> None:
    _claim_for(tmp_path, "elsewhere", 1)
    with pytest.raises(RunDirInUseError, match=r"on host elsewhere.*resume=true"):
        claim(tmp_path)
    claim(tmp_path, resume=True)  # a requeued job continuing on a new node


def test_train_fails_before_work_in_a_directory_another_run_owns(tmp_path, sleeper) -> None:
    _claim_for(tmp_path, socket.gethostname(), sleeper.pid)
    with pytest.raises(RunDirInUseError):
        train(compose_config(FAST), run_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CLAIM]  # nothing written


def _cli(cwd: Path, *overrides: str, multirun: bool = False) -> subprocess.Popen:
    root = str(Path(theria.__file__).parent.parent)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root)
    env.pop("THERIA_RUN_ID", None)
    cmd = [sys.executable, "-m", "theria.train", *(["-m"] if multirun else []), *FAST, *overrides]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


@pytest.mark.slow
def test_two_sweeps_and_two_runs_of_one_name_launched_together_keep_all_results(tmp_path):
    """Launched at once, they resolve their folder names in the same second (before issue 17:
    one folder, results overwritten, TensorBoard files mixed)."""
    procs = [_cli(tmp_path, "name=same", "seed=0,1", multirun=True) for _ in range(2)]
    procs += [_cli(tmp_path, "name=same") for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    sweeps = sorted((tmp_path / "outputs" / "multirun" / "same").iterdir())
    runs = sorted(d for d in (tmp_path / "outputs" / "same").iterdir())
    assert len(sweeps) == 2 and len(runs) == 2, (sweeps, runs)
    results = [d / job / "results.json" for d in sweeps for job in ("0", "1")]
    results += [d / "results.json" for d in runs]
    assert all(r.exists() for r in results)
    seeds = sorted(json.loads(r.read_text())["config"]["seed"] for r in results[:4])
    assert seeds == [0, 0, 1, 1]
