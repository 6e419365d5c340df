"""The meta-training loop behind `python -m theria.train`: `train(cfg)` is a plain function.

Read `train()` top to bottom; each numbered section is a named step below it:
1. set-up (`_setup`, `_resume`, `_meta_step`): the checked config, process group, run
   directory, seeds, sampler, model, algorithm, meta-parameters, optimizer, and the meta-step;
   a resumed run restores all of it from the checkpoint.
2. step: sample `meta_batch` training tasks (each rank of dist=ddp draws meta_batch /
   world_size from `task_generator(seed, rank)`), then one `MetaStep` (theria.algos.step):
   the algorithm's meta-gradient over all tasks at once (`algo.batching`), the all-reduce over
   ranks, clipping, the optimizer; on CUDA captured once as a CUDA graph and replayed
   (`graph`). The device is read only at log, sanity, validation and checkpoint steps, where a
   non-finite step is also caught (`_check_finite`).
3. log (`_log_step`, `_sanity`): TensorBoard scalars, the progress bar, the HVP sanity checks.
4. evaluate (`_validate`): meta-validation on the same tasks every time.
5. checkpoint (`_checkpoint`): atomic, every rank's task stream; only after the finite check.
6. finish (`_finish`): the meta-test, results.json, the HParams summary (rank 0).
"""

from __future__ import annotations

import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from theria import distributed as D
from theria._warnings import warn_once
from theria.algos import IMAML, LR_PREFIX, MAML, Params
from theria.algos.common import resolve_batching, set_loss
from theria.algos.step import MetaStep, NonFiniteStepError
from theria.distributed import task_generator
from theria.tasks import Episode, TaskSampler
from theria.train import tboard
from theria.train.build import (
    DTYPES,
    ConfigError,
    Optimization,
    build_algo,
    build_model,
    build_optimizer,
    build_sampler,
    check_config,
    place_lr,
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
from theria.train.memory import PeakMemory
from theria.train.provenance import now_iso, provenance
from theria.train.rundir import claim, default_run_dir

RESULTS = "results.json"
# iMAML: a true CG residual above this (relative, max over the tasks) is reported, once: the
# meta-gradient error is at most cond(A) times it, so a larger one is no implicit gradient.
CG_TOLERANCE = 0.05
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


_POSTFIX_ORDER = {"loss": 0, "val": 1}  # the bar's postfix: what a narrow terminal keeps


class _Scalars:
    """TensorBoard writer (imported only when enabled) and the console bar."""

    def __init__(self, cfg: DictConfig, tb_dir: Path, start: int, enabled: bool = True,
                 label: str = "") -> None:  # fmt: skip
        self.writer = None
        if cfg.logger.tensorboard and enabled:
            from torch.utils.tensorboard import SummaryWriter  # heavy: only when logging

            # purge_step: TensorBoard hides events at steps > `start` left in this folder by
            # the interrupted run (they are redone from the checkpoint)
            self.writer = SummaryWriter(str(tb_dir), purge_step=start + 1 if start else None)
        # Lightning's habits: a bar on a terminal; where stderr is not one (sweeps, SLURM
        # logs, joblib workers) a plain line per validation instead of bar redraws.
        self.label = label or cfg.name
        self.steps = cfg.steps
        show = bool(cfg.logger.progress and enabled)
        self.lines = show and not sys.stderr.isatty()
        self.bar = None
        self.post: dict[str, str] = {}  # the bar's postfix: no placeholder before a value exists
        if show and not self.lines:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, desc=self.label, dynamic_ncols=True,
                            file=sys.stderr)  # fmt: skip

    def show(self, refresh: bool = False, **values: str) -> None:
        """Sets postfix values (a later value replaces an earlier one, e.g. val). The losses
        come first: a narrow terminal cuts the postfix's tail (tasks/s), not the validation."""
        merged = self.post | values
        self.post = dict(sorted(merged.items(), key=lambda kv: _POSTFIX_ORDER.get(kv[0], 99)))
        if self.bar is not None:
            self.bar.set_postfix(self.post, refresh=refresh)

    def line(self, step: int) -> None:
        """Without a terminal: one line with the current values."""
        if self.lines:
            vals = " ".join(f"{k}={v}" for k, v in self.post.items())
            print(f"[{self.label}] step {step}/{self.steps} {vals}", file=sys.stderr, flush=True)

    def phase(self, what: str, total: int) -> Callable[[int], object] | None:
        """A transient bar under the main one for a validation or the meta-test (its update
        function), None without a terminal bar."""
        if self.bar is None or total <= 0:
            return None
        from tqdm import tqdm

        sub = tqdm(total=total, desc=f"{self.label} {what}", unit="task", leave=False,
                   dynamic_ncols=True, file=sys.stderr, position=1)  # fmt: skip

        def update(n: int) -> None:
            sub.update(n)
            if sub.n >= total:
                sub.close()

        return update

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


# --------------------------------------------------------------------------- set-up


@dataclass
class Run:
    """Everything a training run holds: built by `_setup`, used by the steps below."""

    cfg: DictConfig
    ctx: D.DistContext
    dir: Path
    device: torch.device
    dtype: torch.dtype
    sampler: TaskSampler
    model: torch.nn.Module
    algo: MAML | IMAML
    params: Params
    optim: Optimization
    train_gen: torch.Generator
    resolved: dict[str, Any]
    n_local: int  # tasks this rank draws per meta-step
    sanity_every: int
    step_fn: MetaStep | None = None
    start: int = 0  # the step a resumed run continues after
    history: list[dict] = field(default_factory=list)
    elapsed: float = 0.0
    last_good: tuple[Path, int] | None = None
    tb_label: str = ""  # the event folder <dir>/<tb_label> (theria.train.tboard.label)
    mem: PeakMemory | None = None  # this run's peak (theria.train.memory), from the first step
    started_at: str = ""
    sanity_max: dict[str, float] = field(default_factory=dict)  # this invocation's worst checks
    t_start: float = 0.0

    @property
    def ckpt_path(self) -> Path:
        return self.dir / CHECKPOINT

    @property
    def tb_dir(self) -> Path:
        return self.dir / self.tb_label


def _setup(cfg: DictConfig, run_dir: str | Path | None) -> Run:
    """Checked config, process group, run directory, seeds, sampler, model, algorithm,
    meta-parameters and optimizer."""
    cfg = check_config(cfg)
    ctx = D.DistContext()
    if cfg.dist.name == "ddp":
        ctx = D.setup(cfg.dist.backend, cfg.dist.timeout_s, cfg.device)
        if not ctx.distributed:
            warn_once("train:ddp-one-process", "theria.train: dist=ddp in a single process "
                      "(not started by torchrun or submitit with several tasks): no data "
                      "parallelism; see docs/DISTRIBUTED.md")  # fmt: skip
    try:
        n_local = D.local_batch(cfg.meta_batch, ctx)
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
    return Run(cfg, ctx, run, device, dtype, sampler, model, algo, params, optim,
               task_generator(cfg.seed, ctx.rank), resolved, n_local, sanity_every)  # fmt: skip


def _resume(r: Run) -> None:
    """Continues from the checkpoint `cfg.resume` names, if any: parameters, optimizer and
    schedule, every rank's task stream, the global RNGs, history and time."""
    resume_from = resolve_resume(r.cfg.resume, r.dir)
    if resume_from is None and _resume_is_true(r.cfg.resume):
        found = _find_resumable(r) if r.ctx.is_main else None
        resume_from = D.broadcast_object(found, r.ctx)
        if resume_from is None:
            warn_once("train:resume-none", f"theria.train: resume=true found no earlier run "
                      f"named {r.cfg.name!r} with this config (under "
                      f"{', '.join(map(str, _resume_roots(r.dir)))}); "
                      f"starting a fresh run in {r.dir}")  # fmt: skip
    if resume_from is None:
        return
    in_run = resume_from.parts[-2:] == CHECKPOINT.parts  # <run>/checkpoints/last.pt
    if in_run and resume_from.parent.parent.resolve() != r.dir.resolve():  # continue *in* it
        print(
            f"[theria.train] continuing in {resume_from.parent.parent} (this invocation's "
            f"directory {r.dir} keeps only Hydra's own files)",
            file=sys.stderr,
        )
        r.dir = resume_from.parent.parent
        if r.ctx.is_main:
            claim(r.dir, r.cfg.resume)  # that run's folder is this run's now (or it refuses)
    state = load_checkpoint(resume_from)
    _check_resumable(state["config"], r.resolved, resume_from)
    with torch.no_grad():
        for k, p in r.params.items():
            p.copy_(state["params"][k])
    r.optim.optimizer.load_state_dict(state["optimizer"])
    r.optim.scheduler.load_state_dict(state["scheduler"])
    place_lr(r.optim.optimizer, r.device)
    gens = state.get("task_generators", [state["task_generator"]])
    if len(gens) != r.ctx.world_size:
        raise ConfigError(
            f"resume: {resume_from} was written by {len(gens)} process(es), this run has "
            f"{r.ctx.world_size}; resume with the same number of ranks (their task streams)"
        )
    r.train_gen.set_state(gens[r.ctx.rank])
    set_rng_state(state["rng"])
    r.start, r.history, r.elapsed = state["step"], state["history"], state["elapsed_s"]
    r.tb_label = state.get("tb_label", r.tb_label)  # the curves continue in the same folder
    r.last_good = (resume_from, r.start)
    print(f"[theria.train] resumed from {resume_from} at step {r.start}", file=sys.stderr)


def _resume_is_true(resume: Any) -> bool:
    return resume is True or str(resume).lower() == "true"


def _resume_roots(run: Path) -> list[Path]:
    """Where runs of the same name live, per conf/config.yaml's hydra.run.dir
    (outputs/<name>/<time>: the run's parent) and hydra.sweep.dir
    (outputs/multirun/<name>/<time>/<job>: its grandparent)."""
    return [run.parent, run.parent.parent]


def _find_resumable(r: Run) -> Path | None:
    """resume=true without a checkpoint of its own: the checkpoint of the latest run (newest
    checkpoint) of the same name whose resolved config equals this one up to
    RESUMABLE_CHANGES, searched under `_resume_roots`; None when there is none."""
    here = r.dir.resolve()
    found: set[Path] = set()
    for root, pattern in zip(
        _resume_roots(r.dir), ("*/" + str(CHECKPOINT), "*/*/" + str(CHECKPOINT)), strict=True
    ):
        found |= {p for p in root.glob(pattern) if p.parent.parent.resolve() != here}
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            saved = load_checkpoint(path)["config"]
        except Exception as e:  # a foreign or torn file is no candidate; say so
            print(
                f"[theria.train] resume=true: skipping {path} ({type(e).__name__}: {e})",
                file=sys.stderr,
            )
            continue
        if saved.get("name") == r.cfg.name:
            try:
                _check_resumable(saved, r.resolved, path)
            except ConfigError:
                continue
            return path
    return None


def _meta_step(r: Run, reduce_grads: ReduceGrads | None) -> MetaStep:
    """The step: the algorithm, the all-reduce over ranks, clipping, the optimizer; captured
    as a CUDA graph where it can be (`graph`), visibly eager where not."""
    cfg = r.cfg
    if reduce_grads is not None:
        reduce = lambda res: replace(res, grads=reduce_grads(res.grads))  # noqa: E731
    elif r.ctx.distributed:
        reduce = lambda res: D.reduce_result(res, r.ctx)  # noqa: E731
    else:
        reduce = None
    lr_changes = cfg.optim.schedule != "constant" or cfg.optim.warmup_steps > 0
    step = MetaStep(r.algo, r.model, r.params, r.optim.optimizer, grad_clip=cfg.optim.grad_clip,
                    graph=cfg.graph, reduce=reduce, lr_changes=lr_changes)  # fmt: skip
    step.steps_done = r.start
    if r.device.type == "cuda" and not step.graphed and cfg.graph == "auto":
        warn_once("train:graph-off", f"theria.train: the meta-step runs without a CUDA graph "
                  f"(slower at small sizes): {step.why_eager}")  # fmt: skip
    return step


# --------------------------------------------------------------------------- checkpoint


def _checkpoint(r: Run, step: int) -> None:
    """Every rank's state into <run>/checkpoints/last.pt (rank 0 writes), atomically."""
    D.assert_same_params(r.params, r.ctx)  # the replicas must still be bitwise equal
    gens = D.gather_objects(r.train_gen.get_state(), r.ctx)  # every rank's task stream
    if r.ctx.is_main:
        save_checkpoint(r.ckpt_path, {
            "step": step,
            "params": {k: v.detach().cpu() for k, v in r.params.items()},
            "optimizer": r.optim.optimizer.state_dict(),
            "scheduler": r.optim.scheduler.state_dict(),
            "task_generator": gens[0],
            "task_generators": gens,
            "rng": rng_state(),
            "history": r.history,
            "elapsed_s": r.elapsed,
            "config": r.resolved,
            "tb_label": r.tb_label,
        })  # fmt: skip
    D.barrier(r.ctx, "the barrier after writing the checkpoint")
    r.last_good = (r.ckpt_path, step)


def _check_finite(r: Run, step_fn: MetaStep) -> None:
    """Raises NonFiniteLossError (naming the step and the last good checkpoint) when a step
    had a non-finite meta-loss or meta-gradient."""
    try:
        step_fn.check()
    except NonFiniteStepError as e:
        raise _non_finite(r, e) from e
    if step_fn.graphed:  # eager steps checked the parameters already
        check_params(r.params, step_fn.steps_done, r.cfg.steps)


def _non_finite(r: Run, e: NonFiniteStepError) -> NonFiniteLossError:
    where = (
        f"the last good checkpoint is {r.last_good[0]} (step {r.last_good[1]}); "
        f"resume={str(r.last_good[0].parent.parent)!r} continues from it"
        if r.last_good else "no checkpoint had been written yet"
    )  # fmt: skip
    return NonFiniteLossError(
        f"non-finite {e.what} at step {e.step} of {r.cfg.steps}: "
        f"{'the run stopped at the next check' if e.applied else 'stopped before applying it'}"
        f"; {where}. {cause(e.stats, first_step=e.step == 1)}."
    )


# --------------------------------------------------------------------------- log


def _log_step(r: Run, log: _Scalars, step: int, stats: dict[str, Tensor], tasks: Episode,
              lr: float, window: list[float]) -> None:  # fmt: skip
    """Scalars of this step (reading the device: only at log steps) to TensorBoard and the bar."""
    m = {k: float(v) for k, v in stats.items()}
    mean_dt = sum(window) / len(window)
    scalars = {
        "train/loss": m["query_loss"],
        "inner/support_loss_pre": m["support_loss_pre"],
        "inner/query_loss_pre": _query_loss_pre(r.model, r.params, tasks),
        "inner/query_loss_post": m["query_loss"],
        "perf/step_time_s": mean_dt,
        "perf/tasks_per_s": r.cfg.meta_batch / mean_dt,
        "perf/peak_mem_mb": r.mem.peak_mb() if r.mem is not None else float("nan"),
        "lr/meta": lr,
        "lr/inner": _inner_lr(r.algo, r.params),
        "train/grad_norm": m["grad_norm"],
    }
    if "query_acc" in m:
        scalars["train/acc"] = m["query_acc"]
    scalars |= {f"imaml/{k}": v for k, v in m.items() if k.startswith(("cg_", "inner_g"))}
    if m.get("cg_true_residual_max", 0.0) > CG_TOLERANCE:
        warn_once("train:cg", f"theria.train: iMAML's CG did not converge at step {step}: "
                  f"true residual ‖b − A x‖/‖b‖ = {m['cg_true_residual_max']:.3g} (max over "
                  f"tasks) > {CG_TOLERANCE}, so the meta-gradient is not the implicit one; "
                  "raise algo.lam, algo.cg_iters or algo.cg_damping (docs/METRICS.md)")  # fmt: skip
    log.scalars(scalars, step)
    post = {"loss": f"{m['query_loss']:.4g}", "tasks/s": f"{r.cfg.meta_batch / mean_dt:.1f}"}
    if "query_acc" in m:
        post["acc"] = f"{m['query_acc']:.3f}"
    log.show(**post)  # val joins once a validation ran (_validate), never as nan


def _sanity(r: Run, log: _Scalars, step: int, tasks: Episode) -> None:
    from theria.sanity import sanity_checks

    # On the run's device: the float64 checks of a CUDA run use the blockwise code for
    # attention (no float64 Triton kernel: attn=theria's auto picks it; an explicit
    # backend='triton' falls back to it with a one-time warning).
    checks = sanity_checks(r.model, r.params, tasks, r.algo, seed=step)
    log.scalars({f"sanity/{k}": v for k, v in checks.items()}, step)
    for k, v in checks.items():  # results.json's sanity_max: the worst value of the run
        r.sanity_max[k] = max(r.sanity_max.get(k, 0.0), v)


# --------------------------------------------------------------------------- evaluate


def _validate(r: Run, step: int, log: _Scalars) -> dict[str, dict[str, float]]:
    cfg = r.cfg
    val = evaluate(r.algo, r.model, r.params, r.sampler, "val", cfg.val_tasks, VAL_SEED,
                   cfg.algo.eval_inner_steps, device=r.device, dtype=r.dtype,
                   progress=log.phase("val", cfg.val_tasks))  # fmt: skip
    r.history.append({"step": step} | {k: v["mean"] for k, v in val.items()})
    log.show(refresh=True, val=f"{val['query_loss_post']['mean']:.4g}")
    log.line(step)
    return val


def _finish(r: Run, log: _Scalars) -> dict[str, Any] | None:
    """Rank 0: the meta-test, results.json and the HParams summary; None on other ranks."""
    if not r.ctx.is_main:
        return None
    cfg = r.cfg
    train_peak = r.mem.stop() if r.mem is not None else float("nan")  # before the meta-test
    test = evaluate(r.algo, r.model, r.params, r.sampler, "test", cfg.test_tasks, TEST_SEED,
                    cfg.algo.eval_inner_steps, device=r.device, dtype=r.dtype,
                    progress=log.phase("meta-test", cfg.test_tasks))  # fmt: skip
    results = {
        "name": cfg.name,
        "overrides": _overrides(),
        "config": r.resolved,
        "steps": cfg.steps,
        "test": test,
        "val_history": r.history,
        "train_time_s": r.elapsed,
        "peak_mem_mb": train_peak,  # this run's steps: see peak_mem_kind, theria.train.memory
        "peak_mem_kind": r.mem.kind if r.mem is not None else None,
        "mem_at_start_mb": r.mem.start_mb if r.mem is not None else None,
        "sanity_max": r.sanity_max,
        "device": str(r.device),
        "world_size": r.ctx.world_size,
        "batching": resolve_batching(r.algo.batching, r.model),
        "cuda_graph": bool(r.step_fn is not None and r.step_fn.graphed),
        "run_dir": str(r.dir),
        "tensorboard": str(r.tb_dir) if cfg.logger.tensorboard else None,
        "checkpoint": str(r.ckpt_path),
    }
    results["provenance"] = provenance(r.device, r.started_at, time.perf_counter() - r.t_start)
    _write_json(r.dir / RESULTS, results)
    if log.writer is not None:
        metrics = {f"test/{k}": v["mean"] for k, v in test.items() if k.startswith("query")}
        metrics |= {"hp_metric": test["query_loss_post"]["mean"], "perf/train_time_s": r.elapsed}
        hp = tboard.hparams(_flatten(r.resolved), _overrides(), tboard.sweep_keys())
        finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
        tboard.write_hparams(log.writer, hp, finite, cfg.steps)
    return results


# --------------------------------------------------------------------------- train


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
    # 1. set-up: config, devices, data, model, algorithm, optimizer; resume
    started_at, t_start = now_iso(), time.perf_counter()
    # An earlier run in this process (a sweep's job, an experiment script's loop) can leave
    # reference cycles holding device memory; free them so this run's peak is its own.
    gc.collect()
    r = _setup(cfg, run_dir)
    r.started_at, r.t_start = started_at, t_start
    r.tb_label = tboard.label(_overrides(), cfg.name, tboard.sweep_keys())
    cfg = r.cfg
    _resume(r)
    step_fn = r.step_fn = _meta_step(r, reduce_grads)
    r.mem = PeakMemory(r.device).start()  # this run's peak, not the process's (sweeps)
    log = _Scalars(cfg, r.tb_dir, r.start, enabled=r.ctx.is_main, label=r.tb_label)
    if log.writer is not None and r.start == 0:
        text = OmegaConf.to_yaml(cfg, resolve=True).replace("\n", "\n    ")
        log.writer.add_text("config", "    " + text)  # indented: a code block in markdown
    window: list[float] = []
    if r.history:  # resumed: the last validation so far
        log.show(val=f"{r.history[-1]['query_loss_post']:.4g}")
    pin = r.device.type == "cuda"
    try:
        for step in range(r.start + 1, cfg.steps + 1):
            # 2. step: sample tasks (overlapping the GPU's previous step), one meta-step
            t0 = time.perf_counter()
            tasks = r.sampler.sample("train", r.n_local, r.train_gen)
            tasks = tasks.to(r.device, r.dtype, non_blocking=pin, pin=pin)
            lr = r.optim.scheduler.get_last_lr()[0]
            try:
                stats = step_fn(tasks)
            except NonFiniteStepError as e:
                raise _non_finite(r, e) from e
            if not step_fn.graphed:  # eager: the outer step left finite parameters (cheap here)
                check_params(r.params, step, cfg.steps)
            r.optim.scheduler.step()
            is_log = step % cfg.logger.log_every == 0 or step == cfg.steps or step == r.start + 1
            is_ckpt = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                step == cfg.steps)  # fmt: skip
            is_val = r.ctx.is_main and ((cfg.eval_every and step % cfg.eval_every == 0)
                                        or step == cfg.steps)  # fmt: skip
            is_sanity = r.sanity_every and r.ctx.is_main and (
                step % r.sanity_every == 0 or step == 1)  # fmt: skip
            if is_log or is_ckpt or is_val or is_sanity:  # the device is read here only
                _check_finite(r, step_fn)
                if r.device.type == "cuda":
                    torch.cuda.synchronize(r.device)
            dt = time.perf_counter() - t0
            r.elapsed += dt
            window.append(dt)

            # 3. log
            if is_log:
                _log_step(r, log, step, stats, tasks, float(lr), window)
                window.clear()
            if is_sanity:
                _sanity(r, log, step, tasks)
            # 4. evaluate
            if is_val:
                val = _validate(r, step, log)
                log.scalars({f"val/{k}": v["mean"] for k, v in val.items()}, step)
            # 5. checkpoint
            if is_ckpt:
                _checkpoint(r, step)
            if log.bar is not None:
                log.bar.update(1)
    except BaseException:
        r.mem.stop()
        log.close()
        raise
    # 6. meta-test and results (rank 0); every rank returns rank 0's results
    results = _finish(r, log)
    r.mem.stop()  # idempotent (rank 0 stopped it before the meta-test)
    log.close()
    # the process group stays for the next run of a sweep in this process (left at exit)
    return D.broadcast_object(results, r.ctx)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
