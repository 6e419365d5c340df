"""train(cfg): tiny runs end to end, TensorBoard contents, exact resume, non-finite stops."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from theria.algos import MAML
from theria.train import ConfigError, NonFiniteLossError, compose_config, train
from theria.train import loop as train_loop
from theria.train.checkpoint import CHECKPOINT, load_checkpoint
from theria.train.evaluate import mean_ci95, t_quantile_975

FAST = ["debug=fast", "task.k_shot=5", "task.k_query=5", "model.hidden=[16,16]"]
SANITY = ("hvp_rev_vs_fwd", "hvp_rev_vs_fd", "hvp_fwd_vs_fd", "hvp_symmetry", "maml_fd_rel_err")


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_tensorboard_holds_config_text_and_hparams(tmp_path: Path) -> None:
    train(compose_config([*FAST, "sanity_every=0", "steps=1"]), run_dir=tmp_path)
    ea = EventAccumulator(str(tmp_path / "default"))
    ea.Reload()
    assert "config/text_summary" in ea.Tags()["tensors"]  # the resolved config, as text
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "inner_lr: 0.01" in text and "name: sinusoid" in text
    hp = ea.PluginTagToContent("hparams")  # what TensorBoard's HParams view reads
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hp)


def test_tiny_run_writes_results_checkpoint_and_sanity_scalars(tmp_path: Path) -> None:
    res = train(compose_config([*FAST, "dtype=float64"]), run_dir=tmp_path)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    test = on_disk["test"]["query_loss_post"]
    assert test["n"] == 8 and math.isfinite(test["mean"]) and test["ci95"] > 0
    assert on_disk["test"] == json.loads(json.dumps(res["test"]))
    assert [h["step"] for h in on_disk["val_history"]] == [2, 4]
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    tb = scalars(tmp_path / "default")
    for name in SANITY:
        steps = [s for s, _ in tb[f"sanity/{name}"]]
        assert steps == [1, 2, 4], name  # step 1, then every sanity_every=2
    # float64, a healthy path: the HVPs agree with each other and with finite differences
    # (central differences with eps=1e-4 leave O(eps²)·‖∇³f‖ ≈ 1e-8-scale error)
    assert max(v for _, v in tb["sanity/hvp_rev_vs_fwd"]) < 1e-10
    assert max(v for _, v in tb["sanity/hvp_rev_vs_fd"]) < 1e-5
    assert max(v for _, v in tb["sanity/maml_fd_rel_err"]) < 1e-5
    for name in ("train/loss", "inner/support_loss_pre", "inner/query_loss_pre",
                 "val/query_loss_post", "val/support_loss_post", "perf/step_time_s",
                 "perf/tasks_per_s", "perf/peak_mem_mb", "lr/meta", "lr/inner",
                 "hp_metric", "test/query_loss_post"):  # fmt: skip
        assert name in tb, name


def _interrupting(after: int):
    """build_algo replacement: the algorithm raises KeyboardInterrupt on meta-step `after`."""
    real = train_loop.build_algo

    class Interrupting(MAML):
        calls = 0

        def __call__(self, *args):
            type(self).calls += 1
            if type(self).calls == after:
                raise KeyboardInterrupt
            return super().__call__(*args)

    def build(cfg):
        return Interrupting(
            **{f.name: getattr(real(cfg), f.name) for f in dataclasses.fields(MAML)}
        )

    return build


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, monkeypatch) -> None:
    over = [
        *FAST,
        "steps=6",
        "checkpoint_every=3",
        "sanity_every=0",
        "eval_every=0",
        "optim=adamw",
        "optim.warmup_steps=2",
        "device=cpu",  # the interrupt is raised in Python, which CUDA-graph replays skip
    ]  # fmt: skip  (a schedule and Adam moments)
    whole = tmp_path / "whole"
    train(compose_config(over), run_dir=whole)

    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(train_loop, "build_algo", _interrupting(after=5))
        with pytest.raises(KeyboardInterrupt):
            train(compose_config(over), run_dir=cut)
    assert load_checkpoint(cut / CHECKPOINT)["step"] == 3

    again = tmp_path / "again"  # resume=<dir> continues *in* <dir>: curves and results one
    train(compose_config([*over, f"resume={cut}"]), run_dir=again)
    assert not (again / "results.json").exists()
    again = cut
    a, b = load_checkpoint(whole / CHECKPOINT), load_checkpoint(again / CHECKPOINT)
    assert a["step"] == b["step"] == 6
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert torch.equal(a["task_generator"], b["task_generator"])
    assert (
        json.loads((whole / "results.json").read_text())["test"]
        == json.loads((again / "results.json").read_text())["test"]
    )


def test_resume_true_in_the_same_directory_continues(tmp_path) -> None:
    tmp_path = tmp_path / "default" / "t0"  # resume=true searches its siblings: none here
    over = [*FAST, "sanity_every=0", "resume=true"]
    train(compose_config([*over, "steps=2"]), run_dir=tmp_path)  # nothing to resume: fresh
    train(compose_config([*over, "steps=4"]), run_dir=tmp_path)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 4
    tb = scalars(tmp_path / "default")
    # each step once (files of one second are read in name order, so sort the steps)
    assert sorted(s for s, _ in tb["train/loss"]) == [1, 2, 3, 4]


def test_resume_refuses_a_different_run(tmp_path) -> None:
    train(compose_config([*FAST, "sanity_every=0"]), run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"algo\.inner_lr: 0\.01 -> 0\.05"):
        train(compose_config([*FAST, "algo.inner_lr=0.05", f"resume={tmp_path / 'a'}"]),
              run_dir=tmp_path / "b")  # fmt: skip
    with pytest.raises(FileNotFoundError, match="resume="):
        train(compose_config([*FAST, f"resume={tmp_path / 'nowhere'}"]), run_dir=tmp_path / "c")


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = train_loop.build_algo

    class Poisoned(MAML):
        calls = 0

        def __call__(self, *args):
            type(self).calls += 1
            out = super().__call__(*args)
            if type(self).calls == 3:
                return dataclasses.replace(out, loss=torch.tensor(float("nan")))
            return out

    def build(cfg):
        return Poisoned(**{f.name: getattr(real(cfg), f.name) for f in dataclasses.fields(MAML)})

    monkeypatch.setattr(train_loop, "build_algo", build)
    # device=cpu: the NaN is injected in Python, which CUDA-graph replays skip (the GPU form of
    # this check injects it on the device: tests/algos/test_step.py)
    cfg = compose_config([*FAST, "steps=5", "sanity_every=0", "checkpoint_every=2", "device=cpu"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite meta-loss nan at step 3 of 5") as e:
        train(cfg, run_dir=tmp_path)
    assert "step 2" in str(e.value) and str(tmp_path / CHECKPOINT) in str(e.value)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 2
    assert not (tmp_path / "results.json").exists()


def test_real_divergence_is_caught(tmp_path) -> None:
    # SGD with a huge step on an MSE loss: the parameters blow up within a few steps
    cfg = compose_config([*FAST, "steps=50", "sanity_every=0", "optim=sgd", "optim.lr=1e6",
                          "checkpoint_every=0", "eval_every=0"])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"at step \d+ of 50.*no checkpoint"):
        train(cfg, run_dir=tmp_path)


def test_t_quantiles_and_interval() -> None:
    # Student-t 0.975 quantiles from standard tables
    for dof, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                   (29, 2.0452), (1000, 1.9623)]:  # fmt: skip
        assert abs(t_quantile_975(dof) - t) < 2e-3 * t, dof
    s = mean_ci95([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4
    assert abs(s["ci95"] - t_quantile_975(3) * math.sqrt(5 / 3) / 2) < 1e-12  # s = √(5/3)


def test_cli_runs_and_reports_paths(tmp_path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, "-m", "theria.train", *FAST, "steps=2", "sanity_every=0",
         "logger=none", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"{tmp_path}/results.json" in out.stdout
    assert (tmp_path / ".hydra" / "config.yaml").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "theria.train", "algo.inner_stepz=2"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert bad.returncode != 0 and "full_key: algo.inner_stepz" in bad.stderr
