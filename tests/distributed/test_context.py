"""The single-process context and the pieces that need no process group: launcher
variables (torchrun's, and SLURM's through submitit), local batches, task streams, the
bitwise parameter checksum."""

from __future__ import annotations

import math

import pytest
import torch

from theria import distributed as D
from theria.algos import MetaStepResult

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7",
            "MASTER_PORT": "29500"}  # fmt: skip


def test_launch_env_from_torchrun_variables():
    env = D.launch_env(TORCHRUN)
    assert env == {"rank": 3, "world_size": 8, "local_rank": 1, "master_addr": "node7",
                   "master_port": 29500}  # fmt: skip
    assert D.launch_env({}) is None
    partial = {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}
    with pytest.raises(D.DistributedError, match=r"\['MASTER_PORT'\] are not"):
        D.launch_env(partial)


def test_launch_env_from_a_submitit_slurm_job(monkeypatch):
    for k in D.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_PROCID": "5",
             "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[017-018]"}  # fmt: skip
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = D.launch_env()
    assert env is not None
    assert (env["rank"], env["world_size"], env["local_rank"]) == (5, 8, 1)
    assert env["master_addr"] == "gpu017"  # the job's first node
    assert 20000 <= int(env["master_port"]) <= 60000  # derived from the job id: same on all
    assert D.launch_env() == env
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task per job: a plain single process
    assert D.launch_env() is None


def test_single_process_context_is_the_identity(monkeypatch):
    for k in D.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    ctx = D.setup(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.backend is None
    grads = {"w": torch.randn(3, 2, dtype=torch.float64)}
    assert D.all_reduce_mean(grads, ctx) is grads
    result = MetaStepResult(torch.tensor(1.0), grads, {"query_loss": 1.0})
    assert D.reduce_result(result, ctx) is result
    D.assert_same_params(grads, ctx)
    assert D.broadcast_object("x", ctx) == "x" and D.gather_objects(7, ctx) == [7]
    assert D.local_batch(6, ctx) == 6
    D.teardown(ctx)


def test_setup_without_a_launcher_warns_when_a_backend_was_asked_for(monkeypatch):
    for k in D.TORCHRUN_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr("theria._warnings._warned", set())
    with pytest.warns(RuntimeWarning, match="no launcher variables"):
        ctx = D.setup(backend="gloo", device="cpu")
    assert ctx.world_size == 1


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="backend must be one of"):
        D.setup(backend="mpi")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        D.setup(timeout_s=0)
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        D.local_batch(6, D.DistContext(rank=1, world_size=4))


def test_task_streams_are_reproducible_and_distinct_per_rank():
    a = torch.rand(4, generator=D.task_generator(3, 0))
    assert torch.equal(a, torch.rand(4, generator=D.task_generator(3, 0)))
    assert not torch.equal(a, torch.rand(4, generator=D.task_generator(3, 1)))
    assert not torch.equal(a, torch.rand(4, generator=D.task_generator(4, 0)))


def test_checksum_sees_every_bit():
    params = {"a": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(7)}
    base = D.params_checksum(params)
    assert torch.equal(base, D.params_checksum({k: v.clone() for k, v in params.items()}))
    for name, idx in (("a", (4, 2)), ("b", (0,)), ("b", (6,))):
        flipped = {k: v.clone() for k, v in params.items()}
        x = flipped[name][idx]
        flipped[name][idx] = torch.nextafter(x, torch.tensor(math.inf, dtype=x.dtype))  # 1 ulp
        assert not torch.equal(base, D.params_checksum(flipped)), (name, idx)
    swapped = {"a": params["a"].clone(), "b": params["b"].flip(0)}
    assert not torch.equal(base, D.params_checksum(swapped))  # positions count
    renamed = {"a2": params["a"], "b": params["b"]}
    assert not torch.equal(base, D.params_checksum(renamed))  # names count
    assert not torch.equal(base, D.params_checksum({"a": params["a"].float(), "b": params["b"]}))


def test_nccl_with_more_ranks_than_gpus_fails_before_joining(monkeypatch):
    """Two torchrun ranks on a one-GPU node: NCCL would fail inside init with "invalid usage";
    setup names the cause first (checked before any process group exists)."""
    env = dict(TORCHRUN, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    joined = []
    monkeypatch.setattr(D.dist, "init_process_group", lambda *a, **k: joined.append(1))
    with pytest.raises(D.DistributedError, match=r"2 ranks .* sees 1 CUDA device.*device=cpu"):
        D.setup(backend="auto", device="auto")
    assert not joined
