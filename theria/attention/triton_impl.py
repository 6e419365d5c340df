"""The `triton` backend's four primitives (the `impl` of `theria.attention.function`).

Same signatures and semantics as `theria/attention/blockwise.py` (the readable spec):

    forward(q, k, v, mask, problem)                                -> (out, lse)
    forward_jvp(q, k, v, mask, problem, out, lse, tq, tk, tv)      -> (o_dot, mu)
    backward(q, k, v, mask, problem, out, lse, do)                 -> (dq, dk, dv)
    backward_jvp(q, k, v, mask, problem, out, lse, do, tq, tk, tv, tdo)
                                                        -> (dq_dot, dk_dot, dv_dot, o_dot)

and, outside the autograd Functions, the fused forward + JVP (one pass, what a forward-mode
caller wants when it needs both):

    forward_and_jvp(q, k, v, mask, problem, tq, tk, tv)            -> (out, lse, o_dot, mu)
    sdpa_jvp(query, key, value, t_query, t_key, t_value, attn_mask=None, is_causal=False,
             scale=None, enable_gqa=False)                         -> (out, out_tangent)

Inputs are canonical (`contract.canonicalize`): q (*B, L, E), k (*B', S, E), v (*B', S, Ev),
batch dims broadcasting, mask None | bool/float broadcastable to (..., L, S). Broadcast dims
(GQA's key/value groups, expanded masks) reach the kernels as stride-0 dims: never copied.
Outputs are over the broadcast batch; gradients are reduced to the inputs' shapes.

lse (and μ) are float32 for 16-bit inputs (a 16-bit lse would cost the backward its
accuracy), else float64: the float32 kernels recompute P as exp((S − hi) − lo) from it, which
keeps their accuracy at large logits (`theria.attention.kernels.lse`). Kernels run on CUDA
tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before this module was imported (the
CI's way to test them).

`backward_jvp` (second order) is `theria.attention.kernels.second_order.backward_jvp` when that
module provides it; otherwise the `torch` backend's blockwise formulas, announced once.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import triton
from torch import Tensor
from torch._C import _functorch as _ft
from triton.runtime.errors import OutOfResources

from theria._warnings import warn_once
from theria.attention import blockwise
from theria.attention.contract import Problem, canonicalize
from theria.attention.kernels import (
    LOG2E,
    MAX_GRID_BATCH,
    MAX_HEAD_DIM,
    TF32X3_MAX_HEAD,
    natural_exp,
    padded_head,
    precision,
)
from theria.attention.kernels import first_order as K
from theria.attention.kernels.launch import SCRATCH, launch, layout_key, scratch_allocator
from theria.attention.kernels.launch import enabled as fast_launch_enabled

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when the kernels were built
# (BLOCK_M, BLOCK_N) in the interpreter: the smallest tile tl.dot takes, which keeps its work
# small; tests set unequal tiles to check the kernels' block bookkeeping (the causal split).
INTERPRET_TILES = (16, 16)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# `backward_jvp` accepts the tangents of out and lse (o_dot, mu) to skip its first pass.
REUSES_TANGENT_STATS = True


# --------------------------------------------------------------------------- torch.func


class _Tracked(Exception):
    """An input is tracked by a torch.func transform that is still active (vmap's batching,
    or a grad/jvp level outside the one now differentiating this step)."""


def _plain(x: Any) -> Any:
    """A torch.func-wrapped tensor as the plain tensor underneath (a kernel needs storage).

    A wrapper of the transform level now running this Function's step (the top of the
    interpreter stack) or of a finished level is peeled: torch.func redoes its bookkeeping on
    the outputs, as it would for torch ops. A wrapper of an *outer* active level (say the grad
    of a jvp) means that level must see this step's ops: then `_Tracked`, and the caller runs
    the differentiable blockwise code instead; likewise for vmap's batched tensors."""
    if not _wrapped(x):
        return x
    stack = _ft.get_interpreter_stack() or []
    active = {i.level() for i in stack}
    top = stack[-1].level() if stack else None
    while _ft.is_functorch_wrapped_tensor(x):
        level = _ft.maybe_get_level(x)
        if _ft.is_batchedtensor(x) or (level in active and level != top):
            raise _Tracked
        x = _ft.get_unwrapped(x)
    return x


def _wrapped(x: Any) -> bool:
    return isinstance(x, Tensor) and _ft.is_functorch_wrapped_tensor(x)


F = TypeVar("F", bound=Callable[..., Any])


def _kernel_entry(fallback: Callable[..., Any]) -> Callable[[F], F]:
    """Unwrap torch.func wrappers before the kernels; where an active transform must track
    the step (vmap, reverse-over-forward), use `fallback` (the blockwise torch ops)."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not (
                torch._C._are_functorch_transforms_active()
                or any(map(_wrapped, args))
                or any(map(_wrapped, kwargs.values()))
            ):  # the common case: plain tensors, nothing to unwrap or keep from wrapping
                return fn(*args, **kwargs)
            try:
                plain = [_plain(a) for a in args]
                plain_kw = {k: _plain(v) for k, v in kwargs.items()}
            except _Tracked:
                warn_once(
                    "triton:torch.func",
                    "theria.sdpa(backend='triton') under a torch.func transform that must track "
                    "this step (vmap, or a derivative taken through a jvp): the kernels cannot "
                    "be traced, so such calls use the torch backend's blockwise code.",
                )
                return fallback(*args, **kwargs)
            # Kernels work on plain tensors: keep torch.func from wrapping what is made here.
            with torch._C._DisableFuncTorch():
                return fn(*plain, **plain_kw)

        return wrapper  # type: ignore[return-value]

    return deco


# --------------------------------------------------------------------------- layout helpers


class _Batch:
    """The broadcast batch of a call as at most three (size, per-tensor stride) dims.

    Every tensor (*b_t, rows, cols) is viewed as expanded to (*batch, rows, cols) (stride 0 on
    broadcast dims, no copy); adjacent batch dims are merged where every tensor allows it, so
    that kernels index three batch dims with each tensor's own strides."""

    def __init__(self, batch: Sequence[int], tensors: Sequence[Tensor | None]) -> None:
        self.batch = tuple(batch)
        self.size = math.prod(self.batch)
        exp = [None if t is None else t.expand(*self.batch, *t.shape[-2:]) for t in tensors]
        self.copied = False
        live = [t for t in exp if t is not None]
        groups: list[list[int]] = []
        for d, n in enumerate(self.batch):
            if n == 1:
                continue
            if groups and all(t.stride(groups[-1][-1]) == t.stride(d) * n for t in live):
                groups[-1].append(d)  # merge: the previous dim steps over this whole dim
            else:
                groups.append([d])
        if len(groups) > 3:
            warn_once(
                "triton:batch-copy",
                "theria.sdpa(backend='triton'): more than three batch dims that cannot be "
                f"merged (batch {self.batch}); copying the inputs to contiguous memory.",
            )
            exp = [None if t is None else t.contiguous() for t in exp]
            self.copied = True
            groups = [[d for d, n in enumerate(self.batch) if n != 1]] if self.size > 1 else []
        self.tensors = exp
        self.groups = groups
        sizes = [math.prod(self.batch[d] for d in g) for g in groups]
        self.z = [1] * (3 - len(sizes)) + sizes  # (Z0, Z1, Z2)

    def strides(self, t: Tensor | None) -> list[int]:
        """(s0, s1, s2, s_row, s_col) of an expanded tensor; zeros for None."""
        if t is None:
            return [0] * 5
        s = [t.stride(g[-1]) for g in self.groups]
        return [0] * (3 - len(s)) + s + [t.stride(-2), t.stride(-1)]


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise TypeError(
            f"theria.sdpa(backend='triton'): dtype {q.dtype} is not supported; expected one of "
            f"{_DTYPES}"
        )
    if not (q.is_cuda or INTERPRET):
        raise ValueError(
            "theria.sdpa(backend='triton') needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"Triton kernels are first used to run them on the CPU; got query on {q.device}"
        )


def _unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why these inputs go to the blockwise torch code instead (visibly), or None."""
    if q.dtype == torch.float64 and q.is_cuda:
        return (
            "float64 has no Triton kernel on CUDA (tl.dot does not compile for float64 there); "
            "using the torch backend's blockwise code for float64 inputs"
        )
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return (
            f"head dims E={q.shape[-1]}, Ev={v.shape[-1]} above {MAX_HEAD_DIM} have no Triton "
            "kernel; using the torch backend's blockwise code for them"
        )
    batch = math.prod(_batch_shape(q.shape[:-2], k.shape[:-2]))  # plain Python: per call
    if batch > MAX_GRID_BATCH:
        return (
            f"a flattened batch of {batch} (query batch dims {tuple(q.shape[:-2])}) exceeds the "
            f"{MAX_GRID_BATCH} programs CUDA allows on the kernels' batch grid axis; using the "
            "torch backend's blockwise code for it"
        )
    return None


def _kernel_stat(t: Tensor | None, q: Tensor) -> Tensor | None:
    """A row statistic (lse, μ) in the dtype the kernels keep it: one from the blockwise code
    (float64, when an earlier step fell back to it) is rounded to it."""
    want = _stat_dtype(q.dtype)
    return t if t is None or t.dtype == want else t.to(want)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of lse and μ: float32 for 16-bit inputs, float64 for float32 and float64 ones
    (float32 kernels read a float64 lse as hi + lo: `theria.attention.kernels.lse`)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _mask_arg(mask: Tensor | None, q: Tensor, L: int, S: int) -> tuple[Tensor, int]:
    """(tensor to index, MASK_KIND): 0 none (a dummy pointer), 1 bool as uint8, 2 additive.
    The mask is expanded to (..., L, S) (a view: broadcast rows get stride 0)."""
    if mask is None:
        return q, 0
    mask = mask.expand(*mask.shape[:-2], L, S)
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1  # same element size: a view, strides kept
    return mask, 2


def _scale_arg(problem: Problem, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[scale in the kernels' exponent units, scale]: log2(e)·scale for exp2 (16-bit inputs),
    scale for natural exp; a tensor keeps float64's scale exact (a Python float is float32)."""
    key = (problem.scale, dtype, device)
    if key not in _SCALES:  # cached: a host-to-device copy per call would stall the launches
        if len(_SCALES) > 64:
            _SCALES.clear()
        unit = 1.0 if natural_exp(dtype) else LOG2E
        values = [problem.scale * unit, problem.scale]
        _SCALES[key] = torch.tensor(values, dtype=_acc_dtype(dtype), device=device)
    return _SCALES[key]


_SCALES: dict[tuple, Tensor] = {}


# Tensor descriptors (TMA loads) for the first-order kernels' streamed operands on Hopper and
# newer: K and V in the forward and the dQ pass, Q and dO in the dK/dV pass, for padded heads of
# TMA_MIN_HEAD (128) and sequences of TMA_MIN_N (4096) or more. Measured on an H200 (bf16, B=2,
# H=16, kernels alone, N = 4096 and 16384, experiments/results/triton_first_order_tma_h200.md):
# at head dim 128 a forward + backward took 0.95-0.96x the pointer loads' time without causality
# and 0.99-1.02x with it; at head dim 64 0.92-1.08x, within the machine's own drift, so 64-wide
# heads keep pointer loads. Shorter sequences keep them too: not measured there, and each
# descriptor launch allocates its scratch (host time, which dominates small calls).
# THERIA_TRITON_TMA=0 (read at import) keeps pointer loads everywhere, for measurements.
# FORCE_TMA (tests) takes the descriptor path in the interpreter at any head dim, where it runs
# in float32 and float64.
_TMA_ENV = os.environ.get("THERIA_TRITON_TMA", "1") != "0"
TMA_MIN_HEAD = 128
TMA_MIN_N = 4096
FORCE_TMA = False


@functools.lru_cache(maxsize=16)
def _tma_device(device: torch.device) -> bool:
    return _TMA_ENV and SCRATCH and torch.cuda.get_device_capability(device)[0] >= 9


def _tma(q: Tensor, v: Tensor, lay: _Batch, *tensors: Tensor) -> bool:
    """Whether a kernel may read `tensors` (expanded views of `lay`) through tensor descriptors:
    16-bit inputs with heads (q's E, v's Ev) padded to TMA_MIN_HEAD and L or S of TMA_MIN_N or
    more on a GPU with TMA (or FORCE_TMA in the interpreter, at any size), and per tensor a unit
    column stride, 16-byte aligned rows and batch steps and a 16-byte aligned start, which a
    descriptor needs. Everything here is part of a launch plan's key (shapes, strides, dtypes,
    alignment, device), so a stored plan never meets a call that would decide otherwise."""
    if INTERPRET:
        if not FORCE_TMA:
            return False
    elif (
        q.dtype not in (torch.float16, torch.bfloat16)
        or padded_head(q.shape[-1], v.shape[-1]) < TMA_MIN_HEAD
        or max(q.shape[-2], v.shape[-2]) < TMA_MIN_N
        or not _tma_device(q.device)
    ):
        return False
    for t in tensors:
        step = 16 // t.element_size()
        *outer, s_col = lay.strides(t)
        if s_col != 1 or any(x % step for x in outer) or t.data_ptr() % 16:
            return False
    return True


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # next power of two (plain Python: cheap per call)


@functools.lru_cache(maxsize=256)
def _consts_cached(E: int, Ev: int, dtype: torch.dtype, mask_kind: int, causal: bool) -> dict:
    natural = natural_exp(dtype)
    return dict(
        E=E,
        EV=Ev,
        BLOCK_D=max(16, _pow2(E)),  # tl.dot needs dims >= 16
        BLOCK_DV=max(16, _pow2(Ev)),
        MASK_KIND=mask_kind,
        IS_CAUSAL=causal,
        F64=dtype == torch.float64,
        NATURAL=natural,
        ACCURATE=natural and not INTERPRET,  # libdevice exp/log, IEEE division (CUDA only)
        RLN=1.0 if natural else LOG2E,  # the scores' unit: exp2 or natural exp
        PREC=precision(dtype, padded_head(E, Ev)),
    )


def _consts(q: Tensor, v: Tensor, mask_kind: int, problem: Problem, L: int, S: int) -> dict:
    return dict(_consts_cached(q.shape[-1], v.shape[-1], q.dtype, mask_kind, problem.is_causal))


def _tune_n(L: int, S: int) -> int:
    return _pow2(max(L, S))  # autotuning bucket


def _autotune() -> bool:
    return os.environ.get("THERIA_TRITON_AUTOTUNE", "1") != "0"


def _launch(tuned: Any, plain: Any, grid_rows: int, zb: int, args: list, consts: dict) -> Any:
    """Run a kernel: in the interpreter with the tiles INTERPRET_TILES; on CUDA autotuned over the
    kernel's configs (THERIA_TRITON_AUTOTUNE=0: the first config that fits), with a fixed small
    FMA tile for IEEE (float64) dots. `args` end with (L, S, TUNE_N). After the first
    call of a tuning key the chosen configuration is launched through `kernels.launch` (Triton's
    autotuner, heuristics and JIT dispatch cost 100-200 µs a launch on an H100 host). Returns
    the launch as a `kernels.launch.Prepared`, or None (interpreter, or the autotuning call)."""
    by_keys = tuned is K.attn_bwd_dkdv_tuned  # programs over key blocks, not query blocks
    if INTERPRET:
        bm, bn = INTERPRET_TILES
        grid = (triton.cdiv(grid_rows, bn if by_keys else bm), zb)
        plain[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn)
        return None
    if consts["PREC"] == "ieee" or not _autotune():
        # The first config that fits the shared memory (head dim 128 needs smaller tiles).
        configs = [K.FMA_CONFIG] if consts["PREC"] == "ieee" else K.candidates(tuned, consts)
        for i, cfg in enumerate(configs):
            try:
                return _launch_config(plain, cfg, grid_rows, zb, args, consts, by_keys)
            except OutOfResources:
                if i == len(configs) - 1:
                    raise
    key = (id(tuned), args[-1], tuple(sorted(consts.items())),
           tuple(a.dtype for a in args if isinstance(a, Tensor)))  # fmt: skip
    cfg = _BEST.get(key)
    if cfg is not None:
        return _launch_config(plain, cfg, grid_rows, zb, args, consts, by_keys)

    def grid_fn(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(grid_rows, meta["BLOCK_N"] if by_keys else meta["BLOCK_M"]), zb)

    with scratch_allocator():  # the autotuner's launches (descriptors need scratch)
        tuned[grid_fn](*args, **consts)  # autotunes this key (once), then launches the best
    _BEST[key] = tuned.best_config
    return None


_BEST: dict[tuple, Any] = {}  # tuning key -> the autotuner's choice


def _launch_config(
    plain: Any, cfg: Any, grid_rows: int, zb: int, args: list, consts: dict, by_keys: bool
) -> Any:
    """Launch `plain` (a heuristics-wrapped JITFunction) with one triton.Config."""
    opts = cfg.all_kwargs()
    bm, bn = opts["BLOCK_M"], opts["BLOCK_N"]
    sizes = {"L": args[-3], "S": args[-2], "BLOCK_M": bm, "BLOCK_N": bn}
    heur = {name: fn(sizes) for name, fn in plain.values.items()}  # EVEN_M / EVEN_N
    grid = (triton.cdiv(grid_rows, bn if by_keys else bm), zb)
    return launch(plain, grid, args, {**consts, **opts, **heur})


def _batch_shape(*shapes: Sequence[int]) -> tuple[int, ...]:
    """Broadcast of batch shapes (already checked by `canonicalize`); plain Python, since
    torch.broadcast_shapes costs tens of microseconds a call."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for s in shapes:
        for i, d in enumerate(s, start=n - len(s)):
            if d != 1:
                out[i] = d
    return tuple(out)


def _reduce(g: Tensor, like: Tensor) -> Tensor:
    """Sum a gradient over the broadcast batch down to `like`'s shape, in `like`'s dtype."""
    if g.shape != like.shape:
        g = g.sum_to_size(like.shape)
    return g.to(like.dtype)


# --------------------------------------------------------------------------- launch plans

# A call whose tensors match an earlier call's in shape, strides, dtype and 16-byte alignment
# (and whose problem, device and tuning setting match) reuses that call's prepared launches:
# only the data pointers change, so none of the layout, configuration or Triton dispatch work
# is redone. That work is ~0.2 ms of host time per kernel on an H100 host, which at N=4096 is
# as long as the kernels themselves (experiments/results/triton_first_order_h100.md).
_PLANS: dict[tuple, tuple] = {}
# The runtime arguments a plan replaces on every call (indices into each kernel's argument
# list as `_forward` / `backward` build it): all the tensors but the cached scale.
_FWD_SLOTS = (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11)  # q k v mask tq tk tv out lse o_dot mu
_DKDV_SLOTS = (0, 1, 2, 3, 4, 6, 7, 8, 9)  # q k v mask dO lse delta dK dV
_DQ_SLOTS = (0, 1, 2, 3, 4, 6, 7, 8, 9)  # q k v mask dO lse delta dQ out


def _plan_key(kind: str, problem: Problem, *tensors: Tensor | None) -> tuple | None:
    """The cache key of a call (None under the interpreter: nothing to save there)."""
    if not fast_launch_enabled():
        return None
    return (kind, problem, _autotune(), tensors[0].device, *map(layout_key, tensors))  # type: ignore[union-attr]


def _forward_from_plan(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem
) -> tuple[Tensor, Tensor] | None:
    """(out, lse) through the stored launch of an earlier call of this layout, or None. A plan
    exists only for inputs the kernels took, so a hit needs no further checks."""
    key = _plan_key("fwd", problem, q, k, v, mask)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        return None
    prep, out_shape, lse_shape, lse_dtype = plan
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=lse_dtype, device=q.device)
    m = q if mask is None else mask
    prep.run(tuple(zip(_FWD_SLOTS, (q, k, v, m, q, q, q, out, lse, out, lse), strict=True)))
    return out, lse


def _same(view: Tensor, t: Tensor) -> bool:
    """`view` (an expanded, contiguous version of t) is t's memory as it is: no copy made."""
    return view.data_ptr() == t.data_ptr() and view.shape == t.shape


def _store_plan(key: tuple | None, plan: tuple) -> None:
    if key is None or any(p is None for p in plan if not isinstance(p, tuple)):
        return
    if len(_PLANS) > 1024:
        _PLANS.clear()
    _PLANS[key] = plan


# --------------------------------------------------------------------------- forward


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None] | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Forward, with the fused JVP when `tangents` is given (then some may be None)."""
    key = _plan_key("fwd", problem, q, k, v, mask) if tangents is None else None
    _check(q, k, v)
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    tq, tk, tv = tangents if tangents is not None else (None, None, None)
    mask_t, mask_kind = _mask_arg(mask, q, L, S)
    mshape = mask.shape[:-2] if mask is not None else ()
    batch = _batch_shape(q.shape[:-2], k.shape[:-2], mshape)
    lay = _Batch(batch, [q, k, v, mask_t if mask is not None else None, tq, tk, tv])
    qe, ke, ve, me, tqe, tke, tve = lay.tensors
    me = me if me is not None else mask_t
    out = torch.empty(*batch, L, Ev, dtype=q.dtype, device=q.device)
    lse = torch.empty(*batch, L, dtype=_stat_dtype(q.dtype), device=q.device)
    jvp = tangents is not None
    has_s = jvp and (tq is not None or tk is not None)
    o_dot = torch.empty_like(out) if jvp else None
    mu = torch.empty_like(lse) if has_s else None
    args = [
        qe, ke, ve, me,
        tqe if tqe is not None else q, tke if tke is not None else q,
        tve if tve is not None else q, _scale_arg(problem, q.dtype, q.device),
        out, lse, o_dot if o_dot is not None else out, mu if mu is not None else lse,
        *lay.strides(qe), *lay.strides(ke), *lay.strides(ve),
        *lay.strides(me if mask is not None else None),
        *lay.strides(tqe), *lay.strides(tke), *lay.strides(tve),
        lay.z[1], lay.z[2], L, S, _tune_n(L, S),
    ]  # fmt: skip
    consts = _consts(q, v, mask_kind, problem, L, S)
    consts.update(JVP=jvp, HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None)
    consts["TMA"] = not jvp and _tma(q, v, lay, ke, ve)  # the fused JVP keeps pointer loads
    tuned = K.attn_fwd_dual_tuned if jvp else K.attn_fwd_tuned
    prep = _launch(tuned, K.attn_fwd_plain, L, lay.size, args, consts)
    if not lay.copied and prep is not None:
        prep = prep.without(_FWD_SLOTS)
        _store_plan(key, (prep, out.shape, lse.shape, lse.dtype))
    return out, lse, o_dot, mu


@_kernel_entry(blockwise.forward)
def forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem
) -> tuple[Tensor, Tensor]:
    """O (*B, L, Ev) and the row logsumexp lse (*B, L): one kernel pass, online softmax."""
    if (hit := _forward_from_plan(q, k, v, mask, problem)) is not None:
        return hit
    if (why := _unsupported(q, k, v)) is not None:
        warn_once(f"triton:unsupported:{why}", f"theria.sdpa(backend='triton'): {why}")
        return blockwise.forward(q, k, v, mask, problem)
    out, lse, _, _ = _forward(q, k, v, mask, problem, None)
    return out, lse


def forward_and_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Forward and forward-mode JVP in one kernel pass (canonical inputs, tangents shaped like
    their primals or None): (out (*B, L, Ev), lse (*B, L), o_dot (*B, L, Ev), μ (*B, L) or
    None when Q̇ and K̇ are both None)."""
    if (why := _unsupported(q, k, v)) is not None:
        warn_once(f"triton:unsupported:{why}", f"theria.sdpa(backend='triton'): {why}")
        out, lse = blockwise.forward(q, k, v, mask, problem)
        o_dot, mu = blockwise.forward_jvp(q, k, v, mask, problem, out, lse, tq, tk, tv)
        return out, lse, o_dot, mu
    out, lse, o_dot, mu = _forward(q, k, v, mask, problem, (tq, tk, tv))
    assert o_dot is not None
    return out, lse, o_dot, mu


@_kernel_entry(blockwise.forward_jvp)
def forward_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    out: Tensor,
    lse: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Tangent of O given the saved lse: (Ȯ (*B, L, Ev), μ (*B, L) or None when Ṡ = 0)."""
    if (why := _unsupported(q, k, v)) is not None:
        warn_once(f"triton:unsupported:{why}", f"theria.sdpa(backend='triton'): {why}")
        return blockwise.forward_jvp(q, k, v, mask, problem, out, lse, tq, tk, tv)
    _check(q, k, v)
    lse_dtype, lse = lse.dtype, _kernel_stat(lse, q)
    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    mask_t, mask_kind = _mask_arg(mask, q, L, S)
    mshape = mask.shape[:-2] if mask is not None else ()
    batch = _batch_shape(q.shape[:-2], k.shape[:-2], mshape)
    if tq is None and tk is None and tv is None:
        return torch.zeros(*batch, L, Ev, dtype=q.dtype, device=q.device), None
    lay = _Batch(batch, [q, k, v, mask_t if mask is not None else None, tq, tk, tv])
    qe, ke, ve, me, tqe, tke, tve = lay.tensors
    me = me if me is not None else mask_t
    out_c = out.expand(*batch, L, Ev).contiguous()  # (Zb, L, Ev) as the kernel indexes it
    lse_c = lse.expand(*batch, L).contiguous()
    o_dot = torch.empty(*batch, L, Ev, dtype=q.dtype, device=q.device)
    has_s = tq is not None or tk is not None
    mu = torch.empty(*batch, L, dtype=lse_c.dtype, device=q.device) if has_s else None
    args = [
        qe, ke, ve, me,
        tqe if tqe is not None else q, tke if tke is not None else q,
        tve if tve is not None else q, _scale_arg(problem, q.dtype, q.device),
        out_c, lse_c, o_dot, mu if mu is not None else lse_c,
        *lay.strides(qe), *lay.strides(ke), *lay.strides(ve),
        *lay.strides(me if mask is not None else None),
        *lay.strides(tqe), *lay.strides(tke), *lay.strides(tve),
        lay.z[1], lay.z[2], L, S, _tune_n(L, S),
    ]  # fmt: skip
    consts = _consts(q, v, mask_kind, problem, L, S)
    consts.update(HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None)
    _launch(K.attn_fwd_jvp_tuned, K.attn_fwd_jvp_plain, L, lay.size, args, consts)
    return o_dot, None if mu is None else mu.to(lse_dtype)  # the tangent of lse: its dtype


# --------------------------------------------------------------------------- backward


@_kernel_entry(blockwise.backward)
def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    out: Tensor,
    lse: Tensor,
    do: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """VJP with cotangent dO: the dQ pass (which also stores δ = rowsum(dO∘O)), then the dK/dV
    pass. Gradients come back with the shapes (and dtype) of q, k, v."""
    lse_k = _kernel_stat(lse, q)
    key = _plan_key("bwd", problem, q, k, v, mask, out, lse_k, do)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None and (why := _unsupported(q, k, v)) is not None:  # a plan: supported
        warn_once(f"triton:unsupported:{why}", f"theria.sdpa(backend='triton'): {why}")
        return blockwise.backward(q, k, v, mask, problem, out, lse, do)
    lse = lse_k
    if plan is not None:
        dq_run, dkdv, delta_spec, dq_spec, dk_spec, dv_spec, reduced = plan
        delta = torch.empty(delta_spec[0], dtype=delta_spec[1], device=q.device)
        dq, dk, dv = (torch.empty(sp[0], dtype=sp[1], device=q.device)
                      for sp in (dq_spec, dk_spec, dv_spec))  # fmt: skip
        m = q if mask is None else mask
        dq_run.run(tuple(zip(_DQ_SLOTS, (q, k, v, m, do, lse, delta, dq, out), strict=True)))
        dkdv.run(tuple(zip(_DKDV_SLOTS, (q, k, v, m, do, lse, delta, dk, dv), strict=True)))
        if not reduced:  # each gradient has its input's shape and dtype already
            return dq, dk, dv
        return _reduce(dq, q), _reduce(dk, k), _reduce(dv, v)
    _check(q, k, v)
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    mask_t, mask_kind = _mask_arg(mask, q, L, S)
    mshape = mask.shape[:-2] if mask is not None else ()
    batch = _batch_shape(q.shape[:-2], k.shape[:-2], mshape, do.shape[:-2])
    lay = _Batch(batch, [q, k, v, mask_t if mask is not None else None, do])
    qe, ke, ve, me, doe = lay.tensors
    me = me if me is not None else mask_t
    zb = lay.size
    out_c = out.expand(*batch, L, Ev).contiguous()  # (Zb, L, Ev)
    lse_c = lse.expand(*batch, L).contiguous()
    acc = _acc_dtype(q.dtype)
    delta = torch.empty(*batch, L, dtype=acc, device=q.device)  # written by the dQ pass
    consts = _consts(q, v, mask_kind, problem, L, S)

    # Gradients of broadcast inputs are summed after the kernels: computed per batch entry
    # (in the accumulation dtype, so the sum loses nothing), then reduced to the input's shape.
    def grad_buffer(x: Tensor, rows: int, cols: int) -> Tensor:
        dtype = x.dtype if tuple(x.shape[:-2]) == batch else acc
        return torch.empty(*batch, rows, cols, dtype=dtype, device=q.device)

    dq, dk, dv = grad_buffer(q, L, E), grad_buffer(k, S, E), grad_buffer(v, S, Ev)
    common = [
        *lay.strides(qe), *lay.strides(ke), *lay.strides(ve),
        *lay.strides(me if mask is not None else None), *lay.strides(doe),
        lay.z[1], lay.z[2], L, S, _tune_n(L, S),
    ]  # fmt: skip
    scale = _scale_arg(problem, q.dtype, q.device)
    head = [qe, ke, ve, me, doe, scale, lse_c, delta]
    # dQ first: it stores δ, which the dK/dV pass reads (same stream, so in order)
    # (the dQ pass streams K and V, the dK/dV pass Q and dO: each may read them by descriptor)
    dq_consts = {**consts, "TMA": _tma(q, v, lay, ke, ve)}
    dq_run = _launch(K.attn_bwd_dq_tuned, K.attn_bwd_dq_plain, L, zb,
                     [*head, dq, out_c, *common], dq_consts)  # fmt: skip
    dkdv_consts = {**consts, "TMA": _tma(q, v, lay, qe, doe)}
    dkdv = _launch(K.attn_bwd_dkdv_tuned, K.attn_bwd_dkdv_plain, S, zb, [*head, dk, dv, *common],
                   dkdv_consts)  # fmt: skip
    if not lay.copied and _same(out_c, out) and _same(lse_c, lse) and None not in (dkdv, dq_run):
        specs = [(t.shape, t.dtype) for t in (delta, dq, dk, dv)]
        reduced = any(g.shape != x.shape or g.dtype != x.dtype
                      for g, x in ((dq, q), (dk, k), (dv, v)))  # fmt: skip
        preps = (dq_run.without(_DQ_SLOTS), dkdv.without(_DKDV_SLOTS))
        _store_plan(key, (*preps, *specs, reduced))
    return _reduce(dq, q), _reduce(dk, k), _reduce(dv, v)


@_kernel_entry(blockwise.backward_jvp)
def backward_jvp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    out: Tensor,
    lse: Tensor,
    do: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    tdo: Tensor | None,
    o_dot: Tensor | None = None,
    mu: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """The JVP of `backward` (second order): the kernel of `kernels.second_order` when it
    exists, else `blockwise.backward_jvp` on the same device (announced once). o_dot and mu,
    when given, are the tangents of out and lse (they spare the first pass)."""
    kernel = _second_order()
    why = _unsupported(q, k, v) or _second_order_slow(q, v)
    if kernel is not None and why is None:
        lse, mu = _kernel_stat(lse, q), _kernel_stat(mu, q)
        stats = {}
        if getattr(kernel, "REUSES_TANGENT_STATS", False) or getattr(
            _second_order_module(), "REUSES_TANGENT_STATS", False
        ):
            stats = {"o_dot": o_dot, "mu": mu}
        return kernel(q, k, v, mask, problem, out, lse, do, tq, tk, tv, tdo, **stats)
    if why is not None:
        warn_once(f"triton:unsupported:{why}", f"theria.sdpa(backend='triton'): {why}")
    else:
        warn_once(
            "triton:second-order-fallback",
            "theria.sdpa(backend='triton'): no Triton kernel for the second-order step "
            "(backward_jvp) in this install; using the torch backend's blockwise "
            "implementation on the same device for it (exact, slower).",
        )
    # blockwise takes any implementation's statistics and runs 16-bit inputs in float32
    return blockwise.backward_jvp(q, k, v, mask, problem, out, lse, do, tq, tk, tv, tdo,
                                  o_dot=o_dot, mu=mu)  # fmt: skip


def _second_order_slow(q: Tensor, v: Tensor) -> str | None:
    """Why the second-order step of these (kernel-supported) inputs runs the blockwise code on
    CUDA although the kernels take it, or None: float32 heads wider than 64 (padded), where the
    split-precision second-order kernels are slower than the blockwise torch ops (one HVP
    1.07-1.43x the torch backend's time on an H200, experiments/results/fp32_wide_heads_h200.md)
    while the first-order kernels are faster (0.55-0.83x)."""
    if not q.is_cuda or q.dtype != torch.float32:
        return None
    padded = padded_head(q.shape[-1], v.shape[-1])
    if padded <= TF32X3_MAX_HEAD:
        return None
    return (
        f"float32 with head dims E={q.shape[-1]}, Ev={v.shape[-1]} (padded {padded} > "
        f"{TF32X3_MAX_HEAD}): the second-order step (double backward, forward-over-reverse) "
        "uses the torch backend's blockwise code, faster there than the float32 kernels (one "
        "HVP 1.07-1.43x slower with them on an H200); the forward and backward stay on the "
        "kernels"
    )


def _second_order_module() -> Any:
    try:
        from theria.attention.kernels import second_order
    except ImportError:
        return None
    return second_order


def _second_order() -> Any:
    return getattr(_second_order_module(), "backward_jvp", None)


# --------------------------------------------------------------------------- public helper


def sdpa_jvp(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    t_query: Tensor | None,
    t_key: Tensor | None,
    t_value: Tensor | None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, Tensor]:
    """Attention and its forward-mode tangent in one fused kernel pass (no autograd graph).

    Same arguments as `theria.sdpa` plus tangents shaped like query, key, value (None = 0).
    Returns (out, out_tangent), both (..., L, Ev) (with GQA (..., Hq, L, Ev)). For a
    differentiable tangent use `torch.func.jvp(theria.sdpa, ...)`, which runs the forward and
    the JVP as two kernel passes."""
    c = canonicalize(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa, 256)
    tq = t_query.unflatten(-3, c.q.shape[-4:-2]) if enable_gqa and t_query is not None else t_query
    tk = t_key.unsqueeze(-3) if enable_gqa and t_key is not None else t_key
    tv = t_value.unsqueeze(-3) if enable_gqa and t_value is not None else t_value
    out, _lse, o_dot, _mu = forward_and_jvp(c.q, c.k, c.v, c.mask, c.problem, tq, tk, tv)
    return c.restore(out), c.restore(o_dot)
