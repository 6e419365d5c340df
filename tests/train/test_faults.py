"""Issue 17: checkpoints hold only finite states, a write killed midway leaves nothing behind
that matters (its temporary is removed, the resume is bit-for-bit), and the non-finite error
names the setting that caused it (algo.inner_lr for the inner loop, optim.lr for the outer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import theria
from theria.train import NonFiniteLossError, compose_config, train
from theria.train.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint

FAST = ["debug=fast", "task.k_shot=5", "task.k_query=5", "model.hidden=[16,16]",
        "sanity_every=0", "eval_every=0", "logger=none"]  # fmt: skip


def test_inner_loop_divergence_names_inner_lr(tmp_path) -> None:
    cfg = compose_config([*FAST, "steps=3", "algo.inner_lr=1e30"])
    with pytest.raises(NonFiniteLossError, match=r"step 1 of 3.*inner loop.*algo\.inner_lr") as e:
        train(cfg, run_dir=tmp_path)
    assert "optim.lr or set" not in str(e.value)


@pytest.mark.parametrize(
    ("over", "match"),
    [(["optim=sgd", "optim.lr=1e6", "steps=20"], r"before adaptation.*lower optim\.lr"),
     # the first SGD step overflows the parameters: caught right after the step, never saved
     (["optim=sgd", "optim.lr=3e38", "steps=3"],
      r"non-finite parameters .* after the outer step of step 1 of 3.*optim\.lr")],
)  # fmt: skip
def test_outer_step_divergence_names_optim_lr(tmp_path, over, match) -> None:
    cfg = compose_config([*FAST, *over, "checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError, match=match) as e:
        train(cfg, run_dir=tmp_path)
    assert "algo.inner_lr" not in str(e.value)
    if (tmp_path / CHECKPOINT).exists():  # whatever was saved is finite
        state = load_checkpoint(tmp_path / CHECKPOINT)
        assert all(torch.isfinite(p).all() for p in state["params"].values())


def _state(step: int, value: float) -> dict:
    p = torch.full((3,), value)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {"step": step, "params": {"w": p}, "optimizer": opt.state_dict()}


def test_checkpoint_refuses_nonfinite_params_and_optimizer_state(tmp_path) -> None:
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, _state(1, 1.0))
    with pytest.raises(NonFiniteLossError, match=r"refusing to checkpoint .* step 2.*params\.w"):
        save_checkpoint(path, _state(2, float("nan")))
    bad = _state(3, 1.0)
    bad["optimizer"]["state"][0]["exp_avg"][0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"step 3.*optimizer\.state\.0\.exp_avg"):
        save_checkpoint(path, bad)
    assert load_checkpoint(path)["step"] == 1  # the good one is kept
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("when", ["save", "load"])
def test_stale_temporary_of_a_killed_writer_is_removed(tmp_path, when) -> None:
    path = tmp_path / CHECKPOINT
    save_checkpoint(path, _state(1, 1.0))
    stale = path.with_name(f".last.pt.tmp-{_dead_pid()}")
    stale.write_bytes(b"torn")
    live = path.with_name(f".last.pt.tmp-{os.getppid()}")  # a running process: kept
    live.write_bytes(b"in progress")
    if when == "save":
        save_checkpoint(path, _state(2, 1.0))
    else:
        load_checkpoint(path)
    assert not stale.exists() and live.exists()


# The child meta-trains and, inside the checkpoint write of step 4 (after the data went to the
# temporary file, before the rename), announces itself and waits to be killed.
_CHILD = """
import os, sys, time
from pathlib import Path
from theria.train import compose_config, train
marker, run_dir, over = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
real_fsync, calls = os.fsync, [0]
def fsync(fd):
    real_fsync(fd)
    calls[0] += 1
    if calls[0] == 2:  # the second checkpoint (step 4)
        marker.write_text(str(os.getpid()))
        time.sleep(600)
os.fsync = fsync
train(compose_config(over), run_dir=run_dir)
"""


def test_kill_during_checkpoint_write_then_resume_is_bit_for_bit(tmp_path) -> None:
    over = [*FAST, "steps=6", "checkpoint_every=2", "optim=adamw", "optim.warmup_steps=2"]
    whole, cut, marker = tmp_path / "whole", tmp_path / "cut", tmp_path / "marker"
    train(compose_config(over), run_dir=whole)

    root = str(Path(theria.__file__).parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(marker), str(cut), *over],
                             env=env, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the checkpoint"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    tmp = cut / CHECKPOINT.parent / f".last.pt.tmp-{child.pid}"
    assert tmp.exists()  # the torn write
    # torch.load, not load_checkpoint: that would already remove the temporary
    assert torch.load(cut / CHECKPOINT, weights_only=False)["step"] == 2  # the old one stands

    train(compose_config([*over, "resume=true"]), run_dir=cut)
    assert not tmp.exists()  # removed by the resumed run
    a, b = load_checkpoint(whole / CHECKPOINT), load_checkpoint(cut / CHECKPOINT)
    assert a["step"] == b["step"] == 6
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert all(torch.equal(sa[n], sb[n]) for n in sa), sa.keys()
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert ra["test"] == rb["test"]
