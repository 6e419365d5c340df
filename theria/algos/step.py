"""One meta-training step — the algorithm's meta-gradient, clipping, the optimizer's update —
run eagerly or, on CUDA, captured once per task shape as a CUDA graph and replayed.

At meta-learning sizes (16 tasks, a 4-layer transformer of width 256, L = 64–1024) a step is a
few thousand small kernels: launched one by one from Python and autograd, the GPU idles most of
the time (measured on an H200: busy ~6 % for the per-task loop). Captured as one CUDA graph the
launches cost nothing on the host; the step replays with the same kernels, so the same bits.

    step = MetaStep(algo, model, params, optimizer, grad_clip=1.0, graph="auto")
    stats = step(tasks)        # 0-d device tensors: query_loss, grad_norm, ... (no host sync)
    step.check()               # raises NonFiniteStepError if any step since the last check
                               # had a non-finite meta-loss or meta-gradient (reads the device)

Graph mode ("auto" on CUDA, "on" to insist):
- The first `warmup` steps of each task shape run eagerly on a side stream (Triton autotuning,
  theria's launch plans and the optimizer's state are made there, never during capture); the
  next step is captured and every later one replays: the tasks are copied into the graph's
  input buffers, the graph runs, and nothing waits for it.
- The optimizer must be capturable (Adam/AdamW with `capturable=True`, which keeps its step
  count on the device) and its learning rate a device tensor whenever it changes over the run
  (a float would be baked into the graph). `capturable_optimizer` says why one is not.
- Returned stats are the graph's own output buffers: read them before the next step.
- A non-finite step is not refused before its update (that would be a host synchronisation per
  step): the graph records the first such step on the device, and `check()` — which the
  trainer calls before every log line and checkpoint, and at the end — raises naming it. So a
  checkpoint never holds parameters that a non-finite step has touched.
- Where capture fails, the step falls back to eager, once and visibly (a warning naming the
  reason), and stays eager.

Eager mode checks finiteness every step, before the update (`NonFiniteStepError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

from theria._engine import calling_thread
from theria._warnings import warn_once
from theria.algos.common import MetaStepResult, Params
from theria.tasks.episode import Episode

GraphMode = Literal["auto", "on", "off"]
GRAPH_MODES: tuple[str, ...] = ("auto", "on", "off")
Algorithm = Callable[[nn.Module, Params, Episode], MetaStepResult]


class NonFiniteStepError(RuntimeError):
    """A meta-step's loss or meta-gradient was NaN/inf. `step` is its 1-based index, `what`
    says which ("meta-loss", or "meta-gradient of [names]" where known); `stats` holds that
    step's metrics where known (e.g. support_loss_pre, the support loss before adaptation, which
    tells an inner-loop divergence from an outer one)."""

    def __init__(
        self, step: int, what: str, applied: bool, stats: dict[str, float] | None = None
    ) -> None:
        self.step, self.what, self.applied = step, what, applied
        self.stats = stats or {}  # that step's metrics, where known (support_loss_pre, ...)
        when = "its update was applied (graph mode)" if applied else "stopped before its update"
        super().__init__(f"non-finite {what} at step {step}: {when}")


def capturable_optimizer(optimizer: torch.optim.Optimizer, lr_changes: bool) -> str | None:
    """None when `optimizer` can be captured in a CUDA graph, else the reason it cannot.
    `lr_changes`: the schedule changes the learning rate during the run."""
    for group in optimizer.param_groups:
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            if not group.get("capturable", False):
                return f"{type(optimizer).__name__} was built without capturable=True"
        elif lr_changes or group.get("momentum", 0) or group.get("weight_decay", 0):
            return (
                f"{type(optimizer).__name__} with a changing learning rate, momentum or weight "
                "decay has no capturable form here (Adam/AdamW have one)"
            )
        if lr_changes and not isinstance(group["lr"], Tensor):
            return "the learning rate changes but is a float (it would be frozen in the graph)"
    return None


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's one side stream per device for the eager warm-up steps before capture.
    A new stream per warm-up step leaked: 128 MiB stayed allocated after every in-process run
    on an H200, not freed by gc, no graph or MetaStep alive (experiments/exp_omniglot.py's
    peaks grew run by run) — what cuBLAS's per-stream workspaces, kept for the life of the
    process, would do. One stream bounds that to one set."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class MetaStep:
    """A callable meta-training step over fixed `params` (leaf tensors, updated in place by
    `optimizer`). See the module docstring for the graph mode.

    algo: (model, params, tasks) -> MetaStepResult (theria.algos); reduce: applied to the
    result before the update (e.g. theria.distributed.reduce_result; graphs stay off with
    it); grad_clip: max global norm (0: off); graph: "auto" | "on" | "off"; lr_changes: the
    schedule changes the learning rate (for the capturability check); warmup: eager steps
    per task shape before capture."""

    def __init__(
        self,
        algo: Algorithm,
        model: nn.Module,
        params: Params,
        optimizer: torch.optim.Optimizer,
        *,
        grad_clip: float = 0.0,
        graph: GraphMode = "auto",
        reduce: Callable[[MetaStepResult], MetaStepResult] | None = None,
        lr_changes: bool = True,
        warmup: int = 2,
    ) -> None:
        if graph not in GRAPH_MODES:
            raise ValueError(f"graph must be one of {GRAPH_MODES}; got {graph!r}")
        if grad_clip < 0 or warmup < 1:
            raise ValueError(f"grad_clip must be >= 0 and warmup >= 1; got {grad_clip}, {warmup}")
        self.algo, self.model, self.params, self.optimizer = algo, model, params, optimizer
        self.grad_clip, self.reduce, self.warmup = grad_clip, reduce, warmup
        self.device = next(iter(params.values())).device
        self.why_eager: str | None = None
        if self.device.type != "cuda":
            self.why_eager = f"the parameters are on {self.device} (CUDA graphs need CUDA)"
        elif reduce is not None:
            self.why_eager = "a cross-process reduction runs in the step (dist=ddp)"
        else:
            self.why_eager = capturable_optimizer(optimizer, lr_changes)
        if graph == "on" and self.why_eager is not None:
            raise ValueError(f"graph='on' but the step cannot be captured: {self.why_eager}")
        if graph == "off":
            self.why_eager = "graph='off'"
        self.steps_done = 0  # steps taken through this object (the trainer sets it on resume)
        self._seen: dict[tuple, int] = {}  # task layout -> eager steps run
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Episode, dict[str, Tensor]]] = {}
        self._bad: Tensor | None = None  # (first bad step, loss finite, grads finite)

    @property
    def graphed(self) -> bool:
        """Whether steps are (to be) captured."""
        return self.why_eager is None

    @calling_thread
    def _compute(self, tasks: Episode, counter: Tensor | None) -> dict[str, Tensor]:
        result = self.algo(self.model, self.params, tasks)
        if self.reduce is not None:
            result = self.reduce(result)
        grads = [result.grads[k] for k in self.params]
        norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
        grad_norm = torch.linalg.vector_norm(norms)
        loss_ok = torch.isfinite(result.loss).all()
        grads_ok = torch.isfinite(norms).all()
        if counter is None:  # eager: refuse before the update
            if not bool(loss_ok & grads_ok):
                bad = [k for k, n in zip(self.params, norms.tolist(), strict=True)
                       if n != n or n in (float("inf"), float("-inf"))]  # fmt: skip
                what = (f"meta-loss {float(result.loss)}" if not bool(loss_ok)
                        else f"meta-gradient of {bad[:3]}")  # fmt: skip
                stats = {k: float(v) for k, v in result.stats.items()}
                raise NonFiniteStepError(self.steps_done + 1, what, applied=False, stats=stats)
        else:  # graph: remember the first non-finite step on the device
            counter += 1
            assert self._bad is not None
            first = (self._bad[0] == 0) & ~(loss_ok & grads_ok)
            now = torch.stack([counter[0], loss_ok.long(), grads_ok.long()])
            self._bad.copy_(torch.where(first, now, self._bad))
            pre = result.stats.get("support_loss_pre")
            if pre is not None:  # that step's support loss at θ: inner vs outer divergence
                self._bad_pre.copy_(torch.where(first, pre.double(), self._bad_pre))
        for p, g in zip(self.params.values(), grads, strict=True):
            p.grad = g.to(p.dtype)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result.stats | {"grad_norm": grad_norm.detach()}

    def __call__(self, tasks: Episode) -> dict[str, Tensor]:
        """One step on `tasks` (a batched Episode on the params' device). Returns 0-d device
        tensors: the algorithm's stats and grad_norm (before clipping)."""
        if not self.graphed:
            out = self._compute(tasks, None)
            self.steps_done += 1
            return out
        key = tuple((tuple(t.shape), t.dtype) for t in (*tasks.tensors(), tasks.task_info))
        if key in self._graphs:
            graph, inputs, out = self._graphs[key]
            for dst, src in zip((*inputs.tensors(), inputs.task_info),
                                (*tasks.tensors(), tasks.task_info), strict=True):  # fmt: skip
                dst.copy_(src, non_blocking=True)
            graph.replay()
            self.steps_done += 1
            return out
        if self._bad is None:
            self._bad = torch.zeros(3, dtype=torch.long, device=self.device)
            self._bad_pre = torch.zeros((), dtype=torch.float64, device=self.device)
            self._counter = torch.zeros(1, dtype=torch.long, device=self.device)
        self._counter.fill_(self.steps_done)
        if self._seen.get(key, 0) < self.warmup:  # eager, on a side stream, as for capture
            if not self._seen:  # the side stream is shared: let no other step's work be pending
                torch.cuda.synchronize(self.device)
            self._seen[key] = self._seen.get(key, 0) + 1
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self._compute(tasks, self._counter)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.steps_done += 1
            return out
        return self._capture(key, tasks)

    def _capture(self, key: tuple, tasks: Episode) -> dict[str, Tensor]:
        inputs = tasks._map(lambda t: t.clone())  # the graph's input buffers
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._compute(inputs, self._counter)
        except Exception as e:  # any capture failure falls back to eager, visibly
            self.why_eager = f"capture failed ({type(e).__name__}: {str(e).splitlines()[0]})"
            warn_once(
                "metastep:capture",
                f"theria MetaStep: CUDA graph capture failed, running the meta-step eagerly from "
                f"now on: {self.why_eager}",
            )
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            return self(tasks)
        self._graphs[key] = (graph, inputs, out)
        graph.replay()  # capture records the step; the replay takes it
        self.steps_done += 1
        return out

    def check(self) -> None:
        """Raises NonFiniteStepError for the first non-finite step since the start (graph
        mode; eager steps raise at once). Reads the device: call it at log steps."""
        if self._bad is None:
            return
        step, loss_ok, _ = (int(x) for x in self._bad.tolist())
        if step:
            what = "meta-gradient" if loss_ok else "meta-loss"
            stats = {"support_loss_pre": float(self._bad_pre)}
            raise NonFiniteStepError(step, what, True, stats)
