"""Data-parallel meta-training over processes and GPUs with torch.distributed.

Each rank draws its own tasks of the meta-batch (a generator seeded by (seed, rank)), computes
its meta-gradient with the same algorithm call as a single process, and the meta-gradients are
averaged by one all-reduce of a flattened buffer. Every rank then applies the same optimizer
step to the same averaged gradient, so the parameters stay bitwise identical without ever being
sent (the way DistributedDataParallel keeps replicas in step: Li et al. 2020, "PyTorch
Distributed: Experiences on Accelerating Data Parallel Training", §3). With equal local
batches, the mean of the ranks' means is the mean over the whole meta-batch, so W ranks of
T/W tasks compute the meta-gradient of one process over T tasks up to float rounding.

API summary:

    ctx = setup(backend="auto", timeout_s=600.0, device="auto")   # from torchrun's env vars
    ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, ctx.is_main, ctx.distributed
    n = local_batch(meta_batch, ctx)                  # tasks per rank (meta_batch / world)
    gen = task_generator(seed, ctx.rank)              # the rank's reproducible task stream
    grads = all_reduce_mean(result.grads, ctx)        # the meta-gradient averaged over ranks
    result = reduce_result(result, ctx)               # grads, loss and metrics averaged
    broadcast_params(params, ctx); assert_same_params(params, ctx)   # bitwise-equal replicas
    obj = broadcast_object(obj, ctx); objs = gather_objects(obj, ctx)  # small Python objects
    print0(...)                                       # prints on rank 0 only
    teardown(ctx)

With no launcher (no RANK/WORLD_SIZE in the environment), `setup` returns a one-process
context and every function above is the identity: the single-process trainer and the
data-parallel one run the same code. Launchers understood: torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and SLURM jobs started by submitit (hydra-submitit-
launcher with tasks_per_node > 1), whose variables submitit translates.

A rank that dies or hangs ends the others with `DistributedError` (naming the rank, the
collective and the timeout) instead of a hang: gloo reports a closed connection at once, and
every collective gives up after `timeout_s` (the process group's timeout; NCCL's watchdog then
aborts the communicator, TORCH_NCCL_ASYNC_ERROR_HANDLING's default). Under torchrun the agent
also stops the remaining workers as soon as one exits with an error.
"""

from __future__ import annotations

import atexit
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from theria._warnings import warn_once
from theria.algos.common import MetaStepResult, Params

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")
# the variables torchrun (torch.distributed.run) sets for every worker
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or ranks disagree: another rank died, hung past the timeout, or
    holds different parameters. The message names this rank and the operation."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. `backend` is None for a single process (no
    process group); `owns_group`: `setup` created the group, so `teardown` destroys it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float = 600.0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, checkpoints and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process: collectives are real."""
        return self.world_size > 1


def launch_env(environ: dict[str, str] | None = None) -> dict[str, int | str] | None:
    """The launcher's description of this process: {rank, world_size, local_rank,
    master_addr, master_port}, from torchrun's variables, else (inside a SLURM job that
    submitit started with several tasks) from submitit's translation of SLURM's; None when
    this process was started alone. Incomplete torchrun variables raise, naming those
    missing."""
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise DistributedError(
                f"launch environment: {present} are set but {missing} are not; start the job "
                "with torchrun (which sets all of them) or unset them for a single process"
            )
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env["LOCAL_RANK"]),
            "master_addr": env["MASTER_ADDR"],
            "master_port": int(env["MASTER_PORT"]),
        }
    if int(env.get("SLURM_NTASKS", "1")) > 1 and env.get("SUBMITIT_EXECUTOR") == "slurm":
        # A job of hydra-submitit-launcher with tasks_per_node > 1: one task per GPU, each
        # running the Hydra job; submitit maps SLURM_PROCID/NTASKS/LOCALID/nodelist to
        # rank/world/local rank/master host and derives the port from the job id.
        from submitit.helpers import TorchDistributedEnvironment

        if environ is not None:
            raise ValueError("launch_env: SLURM translation reads os.environ only")
        e = TorchDistributedEnvironment()
        return {
            "rank": e.rank,
            "world_size": e.world_size,
            "local_rank": e.local_rank,
            "master_addr": e.master_addr,
            "master_port": e.master_port,
        }
    return None


def _device_for(local_rank: int, device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device='cuda' but torch.cuda.is_available() is False")
        # one GPU per local rank; a launcher that hides all but one GPU per task leaves 1
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.startswith("cuda:") or device == "cpu":
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {device!r}")


def setup(backend: str = "auto", timeout_s: float = 600.0, device: str = "auto") -> DistContext:
    """Joins the process group the launcher describes (see `launch_env`) and returns this
    process's context; a single process without a launcher gets a context of world size 1.

    backend: "auto" (NCCL when the device is CUDA, else gloo), "gloo" or "nccl".
    timeout_s: how long the rendezvous and every collective may wait for the other ranks
        before failing (the process group's timeout).
    device: "auto" (cuda:<local rank> when CUDA is available, else the CPU), "cpu", "cuda"
        (cuda:<local rank>) or "cuda:N". A CUDA device becomes the current one.

    Reuses a process group that is already initialized (then `teardown` leaves it alone),
    so that several runs in one process (a Hydra sweep under torchrun) share one group: a
    second rendezvous on torchrun's store would wait forever. A group created here is left
    at process exit (atexit) unless `teardown` left it before."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0; got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistContext(rank, world, local, _device_for(local, device),
                           dist.get_backend(), timeout_s, owns_group=False)  # fmt: skip
    env = launch_env()
    if env is None or int(env["world_size"]) == 1:
        if env is None and backend != "auto":
            warn_once(
                "distributed:no-launcher",
                f"theria.distributed: backend={backend!r} asked for, but no launcher variables "
                f"({', '.join(TORCHRUN_VARS)}) are set: running as a single process. Start "
                "with `torchrun --nproc_per_node=P ...` for data parallelism.",
            )
        return DistContext(device=_device_for(0, device), timeout_s=timeout_s)
    rank, world, local = int(env["rank"]), int(env["world_size"]), int(env["local_rank"])
    dev = _device_for(local, device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError(f"backend='nccl' needs CUDA devices; this rank's device is {dev}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if backend == "nccl" and device in ("auto", "cuda"):
        n_gpu = torch.cuda.device_count()
        if local_world > n_gpu:  # NCCL refuses two ranks on one GPU ("invalid usage")
            raise DistributedError(
                f"rank {rank}/{world}: backend nccl needs one CUDA device per rank, but this "
                f"node runs {local_world} ranks (LOCAL_WORLD_SIZE) and sees {n_gpu} CUDA "
                f"device(s), so local rank {local} would share {dev} with local rank "
                f"{local % n_gpu}. Start at most {n_gpu} rank(s) per node, or run the ranks on "
                "the CPU (device=cpu, gloo)"
            )
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    os.environ.setdefault("MASTER_ADDR", str(env["master_addr"]))  # env:// reads these
    os.environ.setdefault("MASTER_PORT", str(env["master_port"]))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev  # binds the communicator to this GPU (eager NCCL init)
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)  # fmt: skip
    except (RuntimeError, ValueError) as e:
        raise DistributedError(
            f"rank {rank}/{world}: joining the process group ({backend}, "
            f"{env['master_addr']}:{env['master_port']}) failed within {timeout_s:g} s; are all "
            f"ranks started and the address reachable? {type(e).__name__}: {e}"
        ) from e
    atexit.register(_leave_at_exit)
    return DistContext(rank, world, local, dev, backend, timeout_s, owns_group=True)


def _leave_at_exit() -> None:
    # no barrier here: after an error, the other ranks may never come to it
    if dist.is_initialized():
        dist.destroy_process_group()


def teardown(ctx: DistContext) -> None:
    """Destroys the process group if `setup` created it, after a barrier: a rank that left
    while another was still finishing a collective could close the connection under it (seen
    here as gloo aborting that rank with "terminate called without an active exception")."""
    if ctx.owns_group and dist.is_initialized():
        barrier(ctx, "the barrier before leaving the process group")
        dist.destroy_process_group()


def _collective(ctx: DistContext, what: str, fn: Callable[[], T]) -> T:
    """Runs a collective, turning the backend's error (closed connection, timeout) into one
    that says what happened."""
    try:
        return fn()
    except RuntimeError as e:
        raise DistributedError(
            f"rank {ctx.rank} of {ctx.world_size}: {what} failed. Another rank probably "
            f"raised, died or hung longer than the process-group timeout ({ctx.timeout_s:g} s); "
            f"see that rank's output for the cause. {type(e).__name__}: {e}"
        ) from e


def local_batch(meta_batch: int, ctx: DistContext) -> int:
    """Tasks per rank: meta_batch / world_size, which must divide evenly (equal local batches
    make the mean of the ranks' means the mean over the meta-batch)."""
    if meta_batch < 1 or meta_batch % ctx.world_size:
        raise ValueError(
            f"meta_batch={meta_batch} must be a positive multiple of the world size "
            f"{ctx.world_size} (each rank takes meta_batch / world_size tasks)"
        )
    return meta_batch // ctx.world_size


def task_generator(seed: int, rank: int = 0) -> torch.Generator:
    """The generator of the training-task stream of process `rank`: a distinct, reproducible
    stream per (seed, rank). Rank 0's stream is a one-process run's stream."""
    return torch.Generator().manual_seed(seed * 1_000_033 + 7919 * rank + 1)


def _flat_sum(ctx: DistContext, tensors: list[Tensor], what: str) -> list[Tensor]:
    """Sums each group of same-dtype tensors over ranks in one flattened buffer per dtype
    (one collective for the usual single-dtype case); returns new tensors."""
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (_, device), idx in groups.items():
        if device.type != ctx.device.type:
            raise DistributedError(
                f"{what}: tensors on {device} but this rank's collectives run on {ctx.device} "
                f"({ctx.backend})"
            )
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx])  # (N,) one buffer
        _collective(ctx, f"all-reduce of the {what}",
                    lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))  # fmt: skip
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset : offset + n].view_as(tensors[i])  # (n,) -> original shape
            offset += n
    return out  # type: ignore[return-value]


def all_reduce_mean(grads: Params, ctx: DistContext) -> Params:
    """The meta-gradient averaged over ranks (every rank receives the same bits); the
    identity for one process. Same keys and shapes as `grads`; the inputs are not modified."""
    if not ctx.distributed:
        return grads
    keys = list(grads)
    summed = _flat_sum(ctx, [grads[k] for k in keys], "meta-gradient")
    return {k: s / ctx.world_size for k, s in zip(keys, summed, strict=True)}


def reduce_result(result: MetaStepResult, ctx: DistContext) -> MetaStepResult:
    """A meta-step's result over all ranks: the meta-gradient, the loss and the metrics
    averaged (metrics ending in `_max` take the maximum), in one flattened buffer (plus one
    small MAX all-reduce when there are `_max` metrics). The identity for one process."""
    if not ctx.distributed:
        return result
    keys = list(result.grads)
    stats = result.stats
    means = sorted(k for k in stats if not k.endswith("_max"))
    maxes = sorted(k for k in stats if k.endswith("_max"))
    dtype = result.loss.dtype if result.loss.is_floating_point() else torch.float64
    scalars = torch.stack([result.loss.reshape(()), *(stats[k].reshape(()) for k in means)])
    scalars = scalars.to(dtype=dtype, device=ctx.device)
    *summed, total = _flat_sum(ctx, [*(result.grads[k] for k in keys), scalars],
                               "meta-gradient, loss and metrics")  # fmt: skip
    grads = {k: s / ctx.world_size for k, s in zip(keys, summed, strict=True)}
    total = total / ctx.world_size
    reduced = {k: v for k, v in zip(means, total[1:], strict=True)}
    if maxes:
        top = torch.stack([stats[k].reshape(()) for k in maxes]).to(ctx.device, torch.float64)
        _collective(ctx, "all-reduce (max) of the metrics",
                    lambda: dist.all_reduce(top, op=dist.ReduceOp.MAX))  # fmt: skip
        reduced |= {k: v for k, v in zip(maxes, top, strict=True)}
    loss = total[0].to(result.loss.device)
    return replace(result, loss=loss, grads=grads, stats=reduced)


def params_checksum(params: Params) -> Tensor:
    """(2,) int64 fingerprint of the exact bits of `params` (names, shapes, dtypes, values):
    a CRC of the layout, and a position-weighted sum of the values' 16-bit pieces. Any
    changed bit changes the sum (weights 1..65521, pieces < 2^16; kept below 2^63, so no
    overflow, for up to ~2·10^9 elements)."""
    layout = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in params.items())
    total = torch.zeros((), dtype=torch.int64)
    pos = 0
    for v in params.values():
        t = v.detach().reshape(-1).cpu()
        if t.is_floating_point() or t.is_complex():
            t = t.view(torch.uint8)  # the raw bytes
        else:
            t = t.to(torch.int64).view(torch.uint8)
        if t.numel() % 2:
            t = torch.cat([t, t.new_zeros(1)])
        pieces = t.view(-1, 2).to(torch.int64)  # (n/2, 2) bytes -> 16-bit pieces
        pieces = pieces[:, 0] + 256 * pieces[:, 1]  # (n/2,)
        weights = (torch.arange(pos, pos + pieces.numel(), dtype=torch.int64) % 65521) + 1
        total += (pieces * weights).sum()
        pos += pieces.numel()
    return torch.stack([torch.tensor(zlib.crc32(layout.encode()), dtype=torch.int64), total])


def assert_same_params(params: Params, ctx: DistContext, what: str = "parameters") -> None:
    """Raises DistributedError on every rank, naming the ranks that differ from rank 0,
    unless all ranks hold bitwise identical `params` (compared through `params_checksum`,
    one all-gather of 2 numbers per rank). Nothing to do for one process."""
    if not ctx.distributed:
        return
    mine = params_checksum(params).to(ctx.device)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    _collective(ctx, f"the check that ranks hold the same {what}",
                lambda: dist.all_gather(every, mine))  # fmt: skip
    differ = [r for r, c in enumerate(every) if not torch.equal(c, every[0])]
    if differ:
        raise DistributedError(
            f"rank {ctx.rank}: the {what} of rank(s) {differ} differ from rank 0's (bitwise "
            "checksum); the replicas diverged (a non-deterministic step, or different "
            "initialization or checkpoint)"
        )


def broadcast_params(params: Params, ctx: DistContext, src: int = 0) -> None:
    """Overwrites every rank's `params` in place with rank `src`'s (one flattened buffer
    per dtype); nothing to do for one process."""
    if not ctx.distributed:
        return
    keys = list(params)
    groups: dict[torch.dtype, list[str]] = {}
    for k in keys:
        groups.setdefault(params[k].dtype, []).append(k)
    with torch.no_grad():
        for names in groups.values():
            flat = torch.cat([params[k].detach().reshape(-1) for k in names]).to(ctx.device)
            _collective(ctx, "broadcast of the parameters",
                        lambda flat=flat: dist.broadcast(flat, src))  # fmt: skip
            offset = 0
            for k in names:
                n = params[k].numel()
                params[k].copy_(flat[offset : offset + n].view_as(params[k]))
                offset += n


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Rank `src`'s picklable `obj` on every rank (e.g. the run directory or the results)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    _collective(ctx, "broadcast of an object", lambda: dist.broadcast_object_list(box, src))
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (e.g. the ranks' task
    generator states for a checkpoint)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    _collective(ctx, "all-gather of objects", lambda: dist.all_gather_object(out, obj))
    return out


def barrier(ctx: DistContext, what: str = "barrier") -> None:
    """Waits for every rank (up to the timeout); nothing to do for one process."""
    if ctx.distributed:
        _collective(ctx, what, dist.barrier)


def print0(*args: Any, ctx: DistContext | None = None, **kwargs: Any) -> None:
    """print on rank 0 only (the rank read from `ctx`, else from the process group or the
    RANK variable)."""
    if ctx is not None:
        rank = ctx.rank
    elif dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    else:
        rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(*args, **kwargs)
