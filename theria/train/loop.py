"""The meta-training loop behind `python -m theria.train`: `train(cfg)` is a plain function.

One meta-step: sample `meta_batch` training tasks, let the algorithm return (meta-loss,
meta-gradient, metrics), average it over ranks (`theria.distributed.reduce_result`: the
identity for one process; under torchrun with dist=ddp an all-reduce, each rank drawing
meta_batch / world_size tasks from `task_generator(seed, rank)`), refuse non-finite values,
clip, step the optimizer and the schedule. Around it: scalars to TensorBoard, HVP sanity
checks (theria.sanity), meta-validation, atomic checkpoints, and at the end a meta-test
evaluation written to results.json; under dist=ddp rank 0 alone logs, checkpoints and
evaluates.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from theria import distributed as D
from theria._warnings import warn_once
from theria.algos import IMAML, LR_PREFIX, MAML, Params
from theria.algos.common import set_loss
from theria.distributed import task_generator
from theria.tasks import Episode, TaskSampler
from theria.train.build import (
    DTYPES,
    ConfigError,
    build_algo,
    build_model,
    build_optimizer,
    build_sampler,
    check_config,
    resolve_device,
)
from theria.train.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from theria.train.evaluate import evaluate
from theria.train.faults import NonFiniteLossError, cause, check_params
from theria.train.rundir import claim, default_run_dir

RESULTS = "results.json"
TB_DIR = "tb"
# Meta-validation and meta-test tasks are the same for every training seed (paired
# comparisons across a sweep); they come from generators seeded with these constants.
VAL_SEED, TEST_SEED = 1_000_003, 2_000_003
# Keys that may change when a run is resumed; any other difference is refused (the run
# would not be the continuation of the checkpointed one).
RESUMABLE_CHANGES = ("resume", "name", "device", "threads", "steps", "eval_every", "val_tasks",
                     "test_tasks", "sanity_every", "checkpoint_every", "logger.",
                     "dist.timeout_s")  # fmt: skip

ReduceGrads = Callable[[Params], Params]


def _run_dir(cfg: DictConfig, run_dir: str | Path | None) -> Path:
    if run_dir is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = HydraConfig.get().runtime.output_dir
        except ValueError:  # not under @hydra.main: a fresh folder like Hydra's
            run_dir = default_run_dir(cfg.name)
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    claim(path, cfg.resume)  # this run owns the folder, or it fails here, before any work
    return path


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    a, b = _flatten(saved), _flatten(now)
    changed = sorted(
        k for k in a.keys() | b.keys()
        if a.get(k) != b.get(k) and not any(k.startswith(p) for p in RESUMABLE_CHANGES)
    )  # fmt: skip
    if changed:
        diffs = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"resume: the config differs from the checkpoint {path} in {diffs}; a resumed run "
            "must keep algo/model/task/optim/seed/meta_batch/dtype (start a new run instead)"
        )


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def _nonfinite(loss: Tensor, grads: Params) -> str | None:
    if not bool(torch.isfinite(loss)):
        return f"meta-loss {float(loss)}"
    bad = [k for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    return f"meta-gradient of {bad[:3]}" if bad else None


class _Scalars:
    """TensorBoard writer (imported only when enabled) and the console bar."""

    def __init__(self, cfg: DictConfig, run_dir: Path, start: int, enabled: bool = True) -> None:
        self.writer = None
        if cfg.logger.tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only when logging

            # purge_step: TensorBoard hides events at steps > `start` left in this folder by
            # the interrupted run (they are redone from the checkpoint)
            self.writer = SummaryWriter(
                str(run_dir / TB_DIR), purge_step=start + 1 if start else None
            )
        self.bar = None
        if cfg.logger.progress and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc=cfg.name, dynamic_ncols=True,
                            file=sys.stderr)  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _query_loss_pre(model: torch.nn.Module, params: Params, tasks: Episode) -> float:
    """Mean query loss over the batch at θ, before adaptation (for the before/after curves)."""
    theta = {k: v.detach() for k, v in params.items() if not k.startswith(LR_PREFIX)}
    with torch.no_grad():
        losses = [
            set_loss(model, tasks.loss, theta, tasks.query_x[i], tasks.query_y[i])[0]
            for i in range(tasks.n_tasks)
        ]
    return float(torch.stack(losses).mean())


def _inner_lr(algo: MAML | IMAML, params: Params) -> float:
    rates = [v.detach() for k, v in params.items() if k.startswith(LR_PREFIX)]
    if rates:  # Meta-SGD: the mean learned rate
        return float(torch.cat([r.reshape(-1) for r in rates]).mean())
    return float(algo.inner_lr)


def train(
    cfg: DictConfig,
    run_dir: str | Path | None = None,
    *,
    reduce_grads: ReduceGrads | None = None,
) -> dict[str, Any]:
    """Meta-trains per `cfg` (a composed conf/config.yaml; see theria/config.py), writing
    TensorBoard events, checkpoints and results.json under `run_dir` (default: Hydra's run
    directory, else outputs/<name>/<time>). Returns the contents of results.json.

    Raises ConfigError (bad values, naming the key) before any work, and NonFiniteLossError
    (naming the step; the last checkpoint is kept) when the meta-loss or meta-gradient
    stops being finite.

    dist=ddp under torchrun: every rank calls this; rank 0's run directory is used by all,
    only rank 0 writes to it, and every rank returns rank 0's results. `reduce_grads`, when
    given, replaces the default reduction (theria.distributed.reduce_result) of the
    meta-gradient."""
    cfg = check_config(cfg)
    ctx = D.DistContext()
    if cfg.dist.name == "ddp":
        ctx = D.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.device)
        if not ctx.distributed:
            warn_once("train:ddp-one-process", "theria.train: dist=ddp in a single process "
                      "(not started by torchrun or submitit with several tasks): no data "
                      "parallelism; see docs/DISTRIBUTED.md")  # fmt: skip
    try:
        n_local = D.local_batch(cfg.meta_batch, ctx)  # tasks this rank draws per meta-step
    except ValueError as e:
        raise ConfigError(f"dist=ddp: {e}") from e
    run = Path(D.broadcast_object(str(_run_dir(cfg, run_dir)) if ctx.is_main else "", ctx))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ctx.device if ctx.distributed else resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    sampler: TaskSampler = build_sampler(cfg)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    model = build_model(cfg).to(device=device, dtype=dtype)
    algo = build_algo(cfg)
    params = algo.init_params(model)
    D.broadcast_params(params, ctx)  # replicas start equal (the same seed already makes them)
    optim = build_optimizer(cfg, params)
    train_gen = task_generator(cfg.seed, ctx.rank)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)

    if cfg.model.name == "mlp" and cfg.attn.name != "theria":
        warn_once("train:attn-mlp", f"theria.train: attn={cfg.attn.name} has no effect with "
                  "model=mlp (no attention); use model=transformer with task=markov, glyphs "
                  "or omniglot")  # fmt: skip
    sanity_every = cfg.sanity_every
    if sanity_every and cfg.model.name == "transformer" and cfg.attn.name == "sdpa":
        warn_once(
            "train:sanity-sdpa",
            "theria.train: HVP sanity checks need double backward, which attn=sdpa (PyTorch's "
            "fused kernels) lacks; sanity checks are off for this run (sanity_every ignored)",
        )
        sanity_every = 0

    ckpt_path = run / CHECKPOINT
    start, history, elapsed, last_good = 0, [], 0.0, None
    resume_from = resolve_resume(cfg.resume, run)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_resumable(state["config"], resolved, resume_from)
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state["params"][k])
        optim.optimizer.load_state_dict(state["optimizer"])
        optim.scheduler.load_state_dict(state["scheduler"])
        gens = state.get("task_generators", [state["task_generator"]])
        if len(gens) != ctx.world_size:
            raise ConfigError(
                f"resume: {resume_from} was written by {len(gens)} process(es), this run has "
                f"{ctx.world_size}; resume with the same number of ranks (their task streams)"
            )
        train_gen.set_state(gens[ctx.rank])
        set_rng_state(state["rng"])
        start, history, elapsed = state["step"], state["history"], state["elapsed_s"]
        last_good = (resume_from, start)
        print(f"[theria.train] resumed from {resume_from} at step {start}", file=sys.stderr)

    def checkpoint(step: int) -> None:
        nonlocal last_good
        D.assert_same_params(params, ctx)  # the replicas must still be bitwise equal
        gens = D.gather_objects(train_gen.get_state(), ctx)  # every rank's task stream
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "step": step,
                "params": {k: v.detach().cpu() for k, v in params.items()},
                "optimizer": optim.optimizer.state_dict(),
                "scheduler": optim.scheduler.state_dict(),
                "task_generator": gens[0],
                "task_generators": gens,
                "rng": rng_state(),
                "history": history,
                "elapsed_s": elapsed,
                "config": resolved,
            })  # fmt: skip
        D.barrier(ctx, "the barrier after writing the checkpoint")
        last_good = (ckpt_path, step)

    def validate(step: int) -> dict[str, dict[str, float]]:
        val = evaluate(algo, model, params, sampler, "val", cfg.val_tasks, VAL_SEED,
                       cfg.algo.eval_inner_steps, device=device, dtype=dtype)  # fmt: skip
        history.append({"step": step} | {k: v["mean"] for k, v in val.items()})
        return val

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    mem_start = _peak_memory_mb(device)
    log = _Scalars(cfg, run, start, enabled=ctx.is_main)
    if log.writer is not None and start == 0:
        text = OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    ")
        log.writer.add_text("config", "    " + text)  # indented: a code block in markdown
    window: list[float] = []
    val_loss = history[-1]["query_loss_post"] if history else float("nan")
    try:
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            tasks = sampler.sample("train", n_local, train_gen).to(device, dtype)
            result = algo(model, params, tasks)
            if reduce_grads is None:  # loss, metrics and meta-gradient averaged over ranks
                result = D.reduce_result(result, ctx)
                grads = result.grads
            else:
                grads = reduce_grads(result.grads)
            bad = _nonfinite(result.loss, grads)
            if bad is not None:
                where = (
                    f"the last good checkpoint is {last_good[0]} (step {last_good[1]}); "
                    f"resume={str(last_good[0].parent.parent)!r} continues from it"
                    if last_good else "no checkpoint had been written yet"
                )  # fmt: skip
                raise NonFiniteLossError(
                    f"non-finite {bad} at step {step} of {cfg.steps}: stopped before applying "
                    f"it; {where}. {cause(result.metrics, first_step=step == 1)}."
                )
            for k, p in params.items():
                p.grad = grads[k].to(p.dtype)
            grad_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.optim.grad_clip)
            lr = optim.scheduler.get_last_lr()[0]
            optim.optimizer.step()
            check_params(params, step, cfg.steps)  # the outer step left finite parameters
            optim.scheduler.step()
            optim.optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            elapsed += dt
            window.append(dt)

            if step % cfg.logger.log_every == 0 or step == cfg.steps or step == start + 1:
                m = result.metrics
                mean_dt = sum(window) / len(window)
                scalars = {
                    "train/loss": m["query_loss"],
                    "inner/support_loss_pre": m["support_loss_pre"],
                    "inner/query_loss_pre": _query_loss_pre(model, params, tasks),
                    "inner/query_loss_post": m["query_loss"],
                    "perf/step_time_s": mean_dt,
                    "perf/tasks_per_s": cfg.meta_batch / mean_dt,
                    "perf/peak_mem_mb": _peak_memory_mb(device),
                    "lr/meta": lr,
                    "lr/inner": _inner_lr(algo, params),
                    "train/grad_norm": grad_norm,
                }
                if "query_acc" in m:
                    scalars["train/acc"] = m["query_acc"]
                scalars |= {
                    f"imaml/{k}": v for k, v in m.items() if k.startswith(("cg_", "inner_g"))
                }
                log.scalars(scalars, step)
                window.clear()
                if log.bar is not None:
                    post = {"loss": f"{m['query_loss']:.4g}", "val": f"{val_loss:.4g}",
                            "tasks/s": f"{cfg.meta_batch / mean_dt:.1f}"}  # fmt: skip
                    if "query_acc" in m:
                        post["acc"] = f"{m['query_acc']:.3f}"
                    log.bar.set_postfix(post, refresh=False)

            if sanity_every and ctx.is_main and (step % sanity_every == 0 or step == 1):
                from theria.sanity import sanity_checks

                # On the run's device: the float64 checks of a CUDA run use the blockwise code
                # for attention (no float64 Triton kernel: attn=theria's auto picks it; an
                # explicit backend='triton' falls back to it with a one-time warning).
                checks = sanity_checks(model, params, tasks, algo, seed=step)
                log.scalars({f"sanity/{k}": v for k, v in checks.items()}, step)

            if ctx.is_main and ((cfg.eval_every and step % cfg.eval_every == 0)
                                or step == cfg.steps):  # fmt: skip
                val = validate(step)
                val_loss = val["query_loss_post"]["mean"]
                log.scalars({f"val/{k}": v["mean"] for k, v in val.items()}, step)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
                checkpoint(step)
            if log.bar is not None:
                log.bar.update(1)
    except BaseException:
        log.close()
        raise

    results = None
    if ctx.is_main:  # rank 0 evaluates and writes; the other ranks wait for its results
        train_peak = _peak_memory_mb(device)  # through meta-training, before the meta-test
        test = evaluate(algo, model, params, sampler, "test", cfg.test_tasks, TEST_SEED,
                        cfg.algo.eval_inner_steps, device=device, dtype=dtype)  # fmt: skip
        results = {
            "name": cfg.name,
            "overrides": _overrides(),
            "config": resolved,
            "steps": cfg.steps,
            "test": test,
            "val_history": history,
            "train_time_s": elapsed,
            "peak_mem_mb": train_peak,
            "mem_at_start_mb": mem_start,  # CPU: the process's RSS before the first step
            "device": str(device),
            "world_size": ctx.world_size,
            "run_dir": str(run),
            "tensorboard": str(run / TB_DIR) if cfg.logger.tensorboard else None,
            "checkpoint": str(ckpt_path),
        }
        _write_json(run / RESULTS, results)
        if log.writer is not None:
            log.writer.add_hparams(_hparams(resolved), _final_metrics(test, history),
                                   run_name=".", global_step=cfg.steps)  # fmt: skip
    log.close()
    # the process group stays for the next run of a sweep in this process (left at exit)
    return D.broadcast_object(results, ctx)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


HPARAM_KEYS = ("algo.name", "attn.name", "task.name", "model.name", "seed", "meta_batch", "steps",
               "dtype", "optim.name", "optim.lr", "algo.inner_steps", "algo.inner_lr",
               "task.k_shot")  # fmt: skip


def _hparams(resolved: dict[str, Any]) -> dict[str, Any]:
    flat = _flatten(resolved)
    return {k: flat[k] for k in HPARAM_KEYS if k in flat}


def _final_metrics(test: dict[str, dict[str, float]], history: list[dict]) -> dict[str, float]:
    out = {f"hparam/test_{k}": v["mean"] for k, v in test.items() if k.startswith("query")}
    out["hparam/test_query_loss_post_ci95"] = test["query_loss_post"]["ci95"]
    if history:
        out["hparam/val_query_loss_post"] = history[-1]["query_loss_post"]
    return {k: v for k, v in out.items() if math.isfinite(v)}
