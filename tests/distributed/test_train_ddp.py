"""`torchrun ... -m theria.train dist=ddp`: 2 gloo ranks end to end (Hydra app, checkpoints,
results), against the 1-process trainer fed the same tasks; configs; resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import launch
from tests.distributed.scenarios import draw
from theria.distributed import task_generator
from theria.train import ConfigError, compose_config, train
from theria.train import loop as train_loop
from theria.train.build import check_config
from theria.train.checkpoint import CHECKPOINT, load_checkpoint

SEED = 0
# device=cpu: gloo ranks on the CPU, also where a GPU exists (two NCCL ranks cannot share one)
OVERRIDES = ["debug=fast", "dtype=float64", "meta_batch=4", "task.k_shot=5", "task.k_query=5",
             "model.hidden=[16,16]", "logger=none", f"seed={SEED}", "threads=1",
             "device=cpu"]  # fmt: skip
# Same argument as tests/distributed/test_data_parallel.py (reordered float64 sums); these
# MLP parameters all have gradients far from 0, so Adam's normalization does not amplify it
RTOL, ATOL = 1e-10, 1e-13


def torchrun(run_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "theria.train", "dist=ddp", *OVERRIDES,
           f"hydra.run.dir={run_dir}", *overrides]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": launch.python_path()}
    import os

    return subprocess.run(cmd, cwd=launch.ROOT, env=os.environ | env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(run)
    done = (run / "results.json").exists()
    assert launch.completed(proc.returncode, proc.stderr, done), (
        proc.stdout[-3000:] + proc.stderr[-6000:]
    )
    # rank 0 alone reports (every rank returns the results)
    assert proc.stdout.count("[theria.train] meta-test query loss") == 1, proc.stdout
    return run


class TwoRankStreams:
    """The trainer's sampler, except that a training draw of n tasks is what 2 ranks draw:
    n/2 from rank 0's stream, then n/2 from rank 1's (val/test draws unchanged)."""

    def __init__(self, inner) -> None:
        self.inner, self.loss = inner, inner.loss
        self.gens = [task_generator(SEED, r) for r in (0, 1)]

    def sample(self, split, n_tasks, generator):
        if split != "train":
            return self.inner.sample(split, n_tasks, generator)
        return draw(self.inner, self.gens, n_tasks // 2, [0, 1])


def test_two_ranks_equal_the_one_process_trainer_on_the_same_tasks(ddp_run, tmp_path, monkeypatch):
    real = train_loop.build_sampler
    monkeypatch.setattr(train_loop, "build_sampler", lambda cfg: TwoRankStreams(real(cfg)))
    ref = train(compose_config(OVERRIDES), run_dir=tmp_path)
    a, b = load_checkpoint(ddp_run / CHECKPOINT), load_checkpoint(tmp_path / CHECKPOINT)
    assert a["step"] == b["step"] == 4
    for k in b["params"]:
        torch.testing.assert_close(a["params"][k], b["params"][k], rtol=RTOL, atol=ATOL)
    # the comparison can fail: rank 0's tasks alone lead elsewhere
    monkeypatch.setattr(train_loop, "build_sampler", real)
    alone = train(compose_config(OVERRIDES), run_dir=tmp_path / "alone")
    c = load_checkpoint(tmp_path / "alone" / CHECKPOINT)
    assert max(float((a["params"][k] - c["params"][k]).abs().max()) for k in c["params"]) > 1e-4
    results = json.loads((ddp_run / "results.json").read_text())
    assert results["world_size"] == 2 and ref["world_size"] == alone["world_size"] == 1
    assert results["test"]["query_loss_post"]["mean"] == pytest.approx(
        ref["test"]["query_loss_post"]["mean"], rel=1e-8
    )


def test_checkpoint_holds_every_ranks_task_stream(ddp_run, tmp_path):
    state = load_checkpoint(ddp_run / CHECKPOINT)
    gens = state["task_generators"]
    assert len(gens) == 2 and torch.equal(gens[0], state["task_generator"])
    assert not torch.equal(gens[0], gens[1])
    # a 2-rank checkpoint cannot continue in 1 process: its rank 1 stream would be lost
    with pytest.raises(ConfigError, match="written by 2 process"), pytest.warns(RuntimeWarning):
        train(compose_config([*OVERRIDES, "dist=ddp", "steps=6", f"resume={ddp_run}"]),
              run_dir=tmp_path)  # fmt: skip


def test_dist_config_group_is_typed_and_checked():
    for name in ("none", "ddp"):
        cfg = check_config(compose_config([f"dist={name}"]))
        assert cfg.dist.name == name and cfg.dist.timeout_s > 0
    with pytest.raises(ConfigError, match=r"dist\.backend='mpi'"):
        check_config(compose_config(["dist=ddp", "dist.backend=mpi"]))
    with pytest.raises(ConfigError, match=r"dist\.timeout_s=0\.0: expected a finite number > 0"):
        check_config(compose_config(["dist=ddp", "dist.timeout_s=0"]))


def test_ddp_in_one_process_warns_and_equals_dist_none(tmp_path, monkeypatch):
    monkeypatch.setattr("theria._warnings._warned", set())
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.warns(RuntimeWarning, match="dist=ddp in a single process"):
        train(compose_config([*OVERRIDES, "dist=ddp"]), run_dir=tmp_path / "ddp")
    train(compose_config([*OVERRIDES, "dist=none"]), run_dir=tmp_path / "none")
    a = load_checkpoint(tmp_path / "ddp" / CHECKPOINT)["params"]
    b = load_checkpoint(tmp_path / "none" / CHECKPOINT)["params"]
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_resumed_ddp_run_equals_the_uninterrupted_one(ddp_run, tmp_path):
    # 2 steps, then resume to 4 in the same directory; against ddp_run (4 steps at once)
    run = tmp_path / "run"
    first = torchrun(run, "steps=2")
    assert launch.completed(first.returncode, first.stderr, (run / "results.json").exists()), (
        first.stderr[-6000:]
    )
    (run / "results.json").unlink()
    second = torchrun(run, "steps=4", "resume=true")
    assert launch.completed(second.returncode, second.stderr, (run / "results.json").exists()), (
        second.stderr[-6000:]
    )
    assert "resumed from" in second.stderr
    a, b = load_checkpoint(ddp_run / CHECKPOINT), load_checkpoint(run / CHECKPOINT)
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert all(torch.equal(x, y) for x, y in zip(a["task_generators"], b["task_generators"],
                                                  strict=True))  # fmt: skip


@pytest.mark.slow
def test_a_sweep_under_torchrun_runs_every_job(tmp_path):
    # a Hydra multirun runs its jobs one after another in each rank's process: they share
    # one process group (a second rendezvous on torchrun's store would wait forever)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "theria.train", "-m", "dist=ddp", *OVERRIDES, "seed=0,1",
           f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": launch.python_path()}
    import os

    proc = subprocess.run(cmd, cwd=launch.ROOT, env=os.environ | env, text=True,
                          capture_output=True, timeout=300)  # fmt: skip
    done = all((tmp_path / j / "results.json").exists() for j in ("0", "1"))
    assert launch.completed(proc.returncode, proc.stderr, done), proc.stderr[-6000:]
    assert done and proc.stdout.count("[theria.train] meta-test query loss") == 2
