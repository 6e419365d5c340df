"""The `torch` backend's four primitives, computed blockwise over keys in plain torch ops.

This file is the readable specification of the Triton kernels: docs/MATH.md derives every
formula below, in the same names. Inputs are in canonical form (`contract.canonicalize`):

    q (*B, L, E), k (*B', S, E), v (*B', S, Ev); *B and *B' broadcast; mask None | (..., L, S)

Per attention row i the primitives keep only row statistics (the logsumexp `lse`, `delta`,
`mu`, `delta_dot`); scores exist one key block at a time, (*B, L, block), never (*B, L, S).

    forward          O, lse                         one pass over key blocks (online softmax)
    forward_jvp      Ȯ, μ  (μ = the tangent of lse) one pass
    backward         dQ, dK, dV                     one pass
    backward_jvp     the JVP of `backward`          two passes (μ and Ȯ first, then the rest)

A tangent given as None is zero and its matmuls are skipped. Everything is out-of-place torch
ops, so `torch.func.vmap` can batch it and autograd can differentiate it (the `Function`s in
`function.py` use that for third and higher orders). Fully masked rows give O = 0, lse = -inf
and zero derivatives.

Precision. The row logsumexp is kept in float64 whatever the inputs' dtype (O(L) bytes). Every
backward pass recomputes P = exp(S − lse); with lse rounded to the inputs' precision, the rows
of that P sum to 1 only within |lse|·ε, and the second-order formulas (Ṡ − μ, dP − δ) amplify
that by the logits' size: at |S| ≈ 100 in float32 the double backward w.r.t. V had 11× the
error of PyTorch's math path. Here lse = hi + lo (two numbers of the inputs' dtype) and
P = exp((S − hi) − lo): S − hi is exact where P matters (S and hi within a factor 2, Sterbenz),
so P's rows sum to 1 within a few ε at any logit size (docs/CONTRACT.md, "Accuracy").
16-bit inputs (float16, bfloat16) are computed in float32 and the results rounded back, as
PyTorch's math path does on the CPU: a 16-bit score overflows at |S| > 65504 (float16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from theria.attention.contract import Problem, mask_scores

# `backward_jvp` accepts the tangents of out and lse (o_dot, mu) to skip its first pass.
REUSES_TANGENT_STATS = True
# dtype of lse and μ (the tangent of lse) from these primitives, for every input dtype
STAT_DTYPE = torch.float64
_LOW = (torch.float16, torch.bfloat16)


def _in_float32(n_stats: int) -> Callable:
    """Runs a primitive on 16-bit inputs in float32: every 16-bit tensor argument is upcast,
    every result but the last `n_stats` (row statistics, kept in STAT_DTYPE) is rounded back to
    the query's dtype. Other dtypes pass through untouched."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(q: Tensor, *args: Any, **kwargs: Any) -> Any:
            if q.dtype not in _LOW:
                return fn(q, *args, **kwargs)

            def up(t: Any) -> Any:
                return t.float() if isinstance(t, Tensor) and t.dtype in _LOW else t

            out = fn(up(q), *map(up, args), **{k: up(t) for k, t in kwargs.items()})
            n = len(out) - n_stats
            return tuple(t.to(q.dtype) if i < n and t is not None else t for i, t in enumerate(out))

        return run

    return wrap


def _blocks(S: int, block: int) -> Iterator[tuple[int, int]]:
    for j0 in range(0, S, block):
        yield j0, min(j0 + block, S)


def _rows(t: Tensor | None, j0: int, j1: int) -> Tensor | None:
    """Rows [j0, j1) of a (..., S, X) tensor. A slice covering all of S is skipped: it would be
    an alias op, which has no batching rule (vmap of the backward would fail)."""
    if t is None or (j0 == 0 and j1 == t.shape[-2]):
        return t
    return t[..., j0:j1, :]


def _scores(qs: Tensor, kb: Tensor, mask: Tensor | None, j0: int, problem: Problem) -> Tensor:
    """Masked scores of one key block; `qs` is q·scale (scaled once per call, not per block)."""
    s = torch.matmul(qs, kb.transpose(-2, -1))  # (*B, L, E) @ (*B', E, b) -> (*B, L, b)
    return mask_scores(s, mask, j0, problem)


Split = tuple[Tensor, Tensor | None]


def _safe(lse: Tensor, like: Tensor) -> Split:
    """lse as hi + lo in the dtype of `like` (lo is None when lse is no more precise than that
    dtype: float64 inputs, or a kernel's float32 lse, which this code may receive when a step
    falls back to it), with -inf (rows with no key) replaced by 0, so exp(s - lse) is 0 there,
    not NaN. Both (*B, L, 1)."""
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).unsqueeze(-1)
    hi = lse.to(like.dtype)
    if torch.finfo(lse.dtype).eps >= torch.finfo(like.dtype).eps:
        return hi, None
    return hi, (lse - hi.to(lse.dtype)).to(like.dtype)


def _mm(a: Tensor, bt: Tensor, add: Tensor | None = None) -> Tensor:
    """add + a @ bt. When a and bt share their batch dims the addition is fused into the
    matmul (baddbmm), which saves a pass over the (*B, L, b) block; `add` broadcasts to the
    result (a row statistic (*B, L, 1), or a whole block)."""
    if add is None:
        return torch.matmul(a, bt)
    if a.dim() > 2 and a.shape[:-2] == bt.shape[:-2]:
        batch, n, m = a.shape[:-2], a.shape[-2], bt.shape[-1]
        add3 = add.expand(*batch, *add.shape[-2:]).reshape(-1, *add.shape[-2:])
        out = torch.baddbmm(add3, a.reshape(-1, n, a.shape[-1]), bt.reshape(-1, bt.shape[-2], m))
        return out.view(*batch, n, m)
    return add + torch.matmul(a, bt)


def _probs(
    qs: Tensor, kb: Tensor, mask: Tensor | None, j0: int, problem: Problem, lse0: Split
) -> Tensor:
    """P for one key block, from the saved row logsumexp: exp((s - hi) - lo) (see the module
    docstring for why in two steps). The mask is applied after the subtraction (-inf stays
    -inf; an additive mask commutes with it)."""
    hi, lo = lse0
    s = _mm(qs, kb.transpose(-2, -1), -hi)  # (*B, L, E) @ (*B', E, b) - (*B, L, 1)
    recorded = torch.is_grad_enabled()  # by autograd (higher orders): out of place
    if lo is not None:
        s = s - lo if recorded else s.sub_(lo)  # s is a fresh temporary
    s = mask_scores(s, mask, j0, problem)
    return torch.exp(s) if recorded else s.exp_()


def _score_tangent(qs: Tensor, kb: Tensor, tqs: Tensor | None, tkb: Tensor | None) -> Tensor | None:
    """Ṡ = scale·(Q̇ Kᵀ + Q K̇ᵀ) for one key block, from qs = scale·Q and tqs = scale·Q̇; the
    mask is constant, so it has no tangent."""
    sd = None
    if tqs is not None:
        sd = torch.matmul(tqs, kb.transpose(-2, -1))  # (*B, L, E) @ (*B', E, b) -> (*B, L, b)
    if tkb is not None:
        t = torch.matmul(qs, tkb.transpose(-2, -1))
        sd = t if sd is None else sd + t
    return sd


def _scaled(t: Tensor | None, scale: float) -> Tensor | None:
    return None if t is None else t * scale


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


@_in_float32(n_stats=1)
def forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem
) -> tuple[Tensor, Tensor]:
    """O (*B, L, Ev) and the row logsumexp lse (*B, L), one pass with the online softmax
    (Milakov & Gimelshein 2018; Dao et al. 2022, Alg. 1)."""
    qs = q * problem.scale
    m = l = acc = m0 = None
    for j0, j1 in _blocks(k.shape[-2], problem.block_size):
        s = _scores(qs, _rows(k, j0, j1), mask, j0, problem)
        # The running max only stabilizes exp(); the result does not depend on it, so it
        # carries no gradient (this keeps the differentiable use of this function clean).
        m_blk = s.detach().amax(dim=-1)
        m_new = m_blk if m is None else torch.maximum(m, m_blk)
        m0 = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m0.unsqueeze(-1))
        pv = torch.matmul(p, _rows(v, j0, j1))  # (*B, L, b) @ (*B', b, Ev) -> (*B, L, Ev)
        if m is None:
            l, acc = p.sum(dim=-1), pv
        else:
            alpha = torch.exp(m - m0)  # rescales what earlier blocks summed
            l = l * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + pv
        m = m_new
    empty = l == 0  # rows whose every key is masked
    l1 = torch.where(empty, torch.ones_like(l), l)
    out = acc / l1.unsqueeze(-1)
    # m0 + log(l) in float64: m0 is exact, log(l) is small, so lse keeps ~ε absolute accuracy
    m0, l1 = m0.to(STAT_DTYPE), l1.to(STAT_DTYPE)
    lse = torch.where(empty, torch.full_like(l1, float("-inf")), m0 + torch.log(l1))
    return out, lse


@_in_float32(n_stats=1)
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
    """Tangent of O for tangents (Q̇, K̇, V̇):  Ȯ = (P∘Ṡ)V − μ∘O + P V̇,  μ = rowsum(P∘Ṡ).

    Returns (Ȯ (*B, L, Ev), μ (*B, L) — the tangent of lse — or None when Ṡ = 0)."""
    lse0 = _safe(lse, q)
    qs, tqs = q * problem.scale, _scaled(tq, problem.scale)
    mu = a = b = None
    for j0, j1 in _blocks(k.shape[-2], problem.block_size):
        kb, vb = _rows(k, j0, j1), _rows(v, j0, j1)
        p = _probs(qs, kb, mask, j0, problem, lse0)
        sd = _score_tangent(qs, kb, tqs, _rows(tk, j0, j1))
        if sd is not None:
            ps = p * sd
            mu = _add(mu, ps.sum(dim=-1))
            a = _add(a, torch.matmul(ps, vb))  # (*B, L, b) @ (*B', b, Ev) -> (*B, L, Ev)
        if tv is not None:
            b = _add(b, torch.matmul(p, _rows(tv, j0, j1)))
    o_dot = b
    if mu is not None:
        o_dot = _add(a - mu.unsqueeze(-1) * out, o_dot)
    if o_dot is None:
        o_dot = torch.zeros_like(out)
    return o_dot, None if mu is None else mu.to(lse.dtype)  # the tangent of lse: its dtype


@_in_float32(n_stats=0)
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
    """VJP with cotangent dO:  dV = Pᵀ dO,  dS = P∘(dO Vᵀ − δ),  dQ = scale·dS K,
    dK = scale·dSᵀ Q,  with δ = rowsum(dO∘O)."""
    lse0 = _safe(lse, q)
    qs = q * problem.scale
    delta = (do * out).sum(dim=-1, keepdim=True)  # (*B, L, 1)
    dq = None
    dks, dvs = [], []
    for j0, j1 in _blocks(k.shape[-2], problem.block_size):
        kb, vb = _rows(k, j0, j1), _rows(v, j0, j1)
        p = _probs(qs, kb, mask, j0, problem, lse0)  # (*B, L, b)
        dvs.append(torch.matmul(p.transpose(-2, -1), do))  # (*B, b, L) @ (*B, L, Ev) -> (*B, b, Ev)
        # dP − δ: (*B, L, Ev) @ (*B', Ev, b) -> (*B, L, b), minus the row statistic
        ds = p * _mm(do, vb.transpose(-2, -1), -delta)
        dq = _add(dq, torch.matmul(ds, kb))  # (*B, L, b) @ (*B', b, E) -> (*B, L, E)
        dks.append(torch.matmul(ds.transpose(-2, -1), qs))  # (*B, b, L) @ (*B, L, E) -> (*B, b, E)
    dq = (dq * problem.scale).sum_to_size(q.shape)
    dk = torch.cat(dks, dim=-2).sum_to_size(k.shape)
    dv = torch.cat(dvs, dim=-2).sum_to_size(v.shape)
    return dq, dk, dv


@_in_float32(n_stats=0)
def lse_backward(
    q: Tensor, k: Tensor, mask: Tensor | None, problem: Problem, lse: Tensor, d_lse: Tensor
) -> tuple[Tensor, Tensor]:
    """VJP of lse alone, cotangent d_lse (*B, L):  dS = P∘d_lse,  dQ = scale·dS K,
    dK = scale·dSᵀ Q. (∂lse_i/∂S_ij = P_ij.) Needed only where a tangent of O, which depends on
    lse, is differentiated in reverse mode."""
    lse0 = _safe(lse, q)
    qs = q * problem.scale
    dq = None
    dks = []
    for j0, j1 in _blocks(k.shape[-2], problem.block_size):
        kb = _rows(k, j0, j1)
        w = _probs(qs, kb, mask, j0, problem, lse0) * d_lse.to(q.dtype).unsqueeze(-1)
        dq = _add(dq, torch.matmul(w, kb))  # (*B, L, b) @ (*B', b, E) -> (*B, L, E)
        dks.append(torch.matmul(w.transpose(-2, -1), qs))  # (*B, b, L) @ (*B, L, E) -> (*B, b, E)
    dq = (dq * problem.scale).sum_to_size(q.shape)
    dk = torch.cat(dks, dim=-2).sum_to_size(k.shape)
    return dq, dk


@_in_float32(n_stats=0)
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
    """The JVP of `backward` along (Q̇, K̇, V̇, dȮ), the total derivative (O and lse are
    functions of Q, K, V). Returns (dQ̇, dK̇, dV̇, Ȯ).

    Because `backward` is the gradient of f = ⟨dO, O(Q, K, V)⟩, its Jacobian in (Q, K, V) is the
    (symmetric) Hessian of f. So the same routine gives the double-backward VJP: for
    cotangents U on (dQ, dK, dV), the gradients are (H U) for Q, K, V and Ȯ(U) for dO.

    Pass 1 (as `forward_jvp`): μ and Ȯ, then δ̇ = rowsum(dO∘Ȯ + dȮ∘O). Skipped when the
    caller already has Ȯ and μ (forward-over-reverse: they are the tangents of out and lse).
    Pass 2, per key block, with Ṗ = P∘(Ṡ − μ), dP = dO Vᵀ, dṖ = dO V̇ᵀ + dȮ Vᵀ:
        dS = P∘(dP − δ),   dṠ = Ṗ∘(dP − δ) + P∘(dṖ − δ̇)
        dQ̇ = scale·(dṠ K + dS K̇),  dK̇ = scale·(dṠᵀ Q + dSᵀ Q̇),  dV̇ = Ṗᵀ dO + Pᵀ dȮ
    """
    if o_dot is None or mu is None:
        o_dot, mu = forward_jvp(q, k, v, mask, problem, out, lse, tq, tk, tv)
    if mu is not None and mu.dtype != q.dtype:  # a float64 (or a kernel's float32) statistic
        mu = mu.to(q.dtype)
    lse0 = _safe(lse, q)
    qs, tqs = q * problem.scale, _scaled(tq, problem.scale)
    delta = (do * out).sum(dim=-1, keepdim=True)  # (*B, L, 1)
    delta_dot = (do * o_dot).sum(dim=-1, keepdim=True)
    if tdo is not None:
        delta_dot = delta_dot + (tdo * out).sum(dim=-1, keepdim=True)
    dq_dot = None
    dks, dvs = [], []
    for j0, j1 in _blocks(k.shape[-2], problem.block_size):
        kb, vb = _rows(k, j0, j1), _rows(v, j0, j1)
        tkb = _rows(tk, j0, j1)
        tvb = _rows(tv, j0, j1)
        p = _probs(qs, kb, mask, j0, problem, lse0)  # (*B, L, b)
        # Ṡ − μ = scale·(Q̇ Kᵀ + Q K̇ᵀ) − μ, the subtraction fused into the matmuls
        sd_c = None
        if tqs is not None:
            sd_c = _mm(tqs, kb.transpose(-2, -1), -mu.unsqueeze(-1))
        if tkb is not None:
            sd_c = _mm(qs, tkb.transpose(-2, -1), -mu.unsqueeze(-1) if sd_c is None else sd_c)
        pd = None if sd_c is None else p * sd_c
        dp_c = _mm(do, vb.transpose(-2, -1), -delta)  # dP − δ, (*B, L, b)
        # dṖ − δ̇ = dO V̇ᵀ + dȮ Vᵀ − δ̇
        dpd_c = -delta_dot
        if tvb is not None:
            dpd_c = _mm(do, tvb.transpose(-2, -1), dpd_c)
        if tdo is not None:
            dpd_c = _mm(tdo, vb.transpose(-2, -1), dpd_c)
        ds = p * dp_c
        dsd = p * dpd_c
        if pd is not None:
            dsd = torch.addcmul(dsd, pd, dp_c)
        # (*B, L, b) @ (*B', b, E) -> (*B, L, E)
        dq_dot = _add(dq_dot, torch.matmul(dsd, kb))
        if tkb is not None:
            dq_dot = dq_dot + torch.matmul(ds, tkb)
        dk_blk = torch.matmul(dsd.transpose(-2, -1), qs)  # (*B, b, L) @ (*B, L, E) -> (*B, b, E)
        if tqs is not None:
            dk_blk = dk_blk + torch.matmul(ds.transpose(-2, -1), tqs)
        dks.append(dk_blk)
        dv_blk = None if pd is None else torch.matmul(pd.transpose(-2, -1), do)
        if tdo is not None:
            dv_blk = _add(dv_blk, torch.matmul(p.transpose(-2, -1), tdo))
        if dv_blk is None:
            dv_blk = torch.zeros_like(vb).expand(*p.shape[:-2], *vb.shape[-2:])
        dvs.append(dv_blk)
    dq_dot = (dq_dot * problem.scale).sum_to_size(q.shape)
    dk_dot = torch.cat(dks, dim=-2).sum_to_size(k.shape)
    dv_dot = torch.cat(dvs, dim=-2).sum_to_size(v.shape)
    return dq_dot, dk_dot, dv_dot, o_dot
