"""First-order attention kernels: forward, forward-mode JVP, backward.

What they compute (names as in `theria/attention/blockwise.py`, the readable spec, and
docs/MATH.md), per attention row i of a flattened batch b:

    _attn_fwd          O = softmax(S) V,  lse = logsumexp(S),  S = scale·Q Kᵀ + mask
                       with JVP=True also, in the same pass, for tangents (Q̇, K̇, V̇):
                       Ṡ = scale·(Q̇ Kᵀ + Q K̇ᵀ),  μ = rowsum(P∘Ṡ),  Ȯ = (P∘Ṡ)V − μ∘O + P V̇
    _attn_fwd_jvp      Ȯ and μ given the saved lse (P = exp(S − lse), no running max)
    _attn_bwd_dq       per query block: δ = rowsum(dO∘O) (stored), dQ = scale·dS K
    _attn_bwd_dkdv     per key block: dV = Pᵀ dO,  dK = scale·dSᵀ Q,  dS = P∘(dO Vᵀ − δ)
                       (launched after the dQ pass, whose δ it reads)

Algorithms: the online softmax over key blocks (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax"; FlashAttention, Dao et al. 2022, Alg. 1) and FlashAttention-2's
backward split into a dK/dV pass over query blocks and a dQ pass over key blocks (Dao 2023,
Alg. 2), with the row statistic δ computed by the dQ pass (FlashAttention-2 has a preprocess
pass for it; folding it in saves a launch, which at small sizes is host time). Causal: the key
(query) blocks that every query of a program's block sees whole run without the causal mask,
only the blocks that straddle the diagonal apply it (two loops over one block step, as
FlashAttention-2's kernels split their loops), and the grid runs the longest tiles first
(`schedule.grid_tile`). The fused JVP carries, next to the
output accumulator, the unnormalized μ, (P∘Ṡ)V and P V̇ under the same running-max rescaling.

Limits and conventions:
- Head dims E, Ev ≤ 256 (anything, padded to the next power of two with masked loads);
  L, S anything (tails masked); L ≠ S fine.
- Batch: up to three batch dims (Z0, Z1, Z2), each tensor with its own strides, stride 0 for
  broadcast dims (GQA keys/values, expanded masks): nothing is copied. The launcher merges
  dims to fit three.
- Mask: MASK_KIND 0 none, 1 boolean (stored as uint8, nonzero = attend), 2 additive float;
  causal is top-left aligned (key j attends query i iff j <= i).
- Precision: 16-bit inputs are multiplied on the tensor cores with float32 accumulation, and
  exponentials are exp2 with the scale pre-multiplied by log2(e) (one multiply less per score).
  float32 inputs use "tf32x3" dots for heads up to 64 wide (PREC: each operand split into a
  TF32 head and tail, three tensor-core products; IEEE float32 dots on the FMA units were 3×
  slower and their long FMA chains put the float32 JVP past 2× PyTorch's error on an H100) and
  IEEE dots for wider heads (`theria.attention.kernels.precision`), and natural exp/log
  (NATURAL=True): folding log2(e) into the scores would round
  s·log2(e) (an error ∝ |s|, not |s − max|) and round-trip lse through log2, which costs
  float32 its 2×-of-torch accuracy. On CUDA (ACCURATE=True) float32/float64 also take exp, log
  and 1/l from libdevice / IEEE division rather than the approximate tl.exp (ex2.approx),
  whose extra ulps the JVP multiplies by |Ṡ|. float64 (the interpreter's checks) is float64
  throughout (F64=True), also NATURAL.
- Rows whose every key is masked: O = 0, lse = -inf, zero derivatives, never NaN.
- RLN is the unit of the scores: log2(e) for exp2 (16-bit), 1 when NATURAL.
- The scale is read from a small tensor (SCALE[0] = scale·log2(e), or scale when NATURAL;
  SCALE[1] = scale) so that a float64 run keeps a float64 scale (a Python float argument is
  float32).
"""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl

try:  # the backend-neutral libdevice (Triton >= 3.0); older layouts kept it per backend
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

from theria.attention.kernels import TF32X3_MAX_HEAD, interpreter_compat
from theria.attention.kernels.lse import load_lse, minus_lse, scale_scores
from theria.attention.kernels.schedule import grid_tile

interpreter_compat.apply()  # Triton < 3.7 under NumPy 2 (see that module)

LN2 = 0.6931471805599453  # ln 2, so ln(x) = log2(x)·LN2


@triton.jit
def _exp(x, NATURAL: tl.constexpr, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.exp(x)  # correctly rounded to ~1 ulp (tl.exp is ex2.approx)
    elif NATURAL:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _batch_offset(pid_b, Z1, Z2, s0, s1, s2):
    """Offset of flattened batch index pid_b = (i0·Z1 + i1)·Z2 + i2 for strides (s0, s1, s2)."""
    i2 = pid_b % Z2
    i1 = (pid_b // Z2) % Z1
    i0 = pid_b // (Z1 * Z2)
    return i0.to(tl.int64) * s0 + i1.to(tl.int64) * s1 + i2.to(tl.int64) * s2


@triton.jit
def _descriptor(X, rows, cols, s_row, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A tensor descriptor of one batch entry's (rows, cols) matrix at X (unit column stride)
    whose loads read (BLOCK_R, BLOCK_C) tiles through Hopper's TMA unit, zero past the edges.
    The launcher only asks for one (TMA=True) where X, the batch offsets and s_row are 16-byte
    aligned (`theria.attention.triton_impl._tma`). Created per program on the device (Triton
    writes it to a global scratch buffer that the launch allocates)."""
    return tl.make_tensor_descriptor(X, shape=[rows, cols], strides=[s_row, 1],
                                     block_shape=[BLOCK_R, BLOCK_C])  # fmt: skip


@triton.jit
def _mask_scores(
    s,
    qi,
    kj,
    MASK,
    smm,
    smn,
    L,
    S,
    RLN: tl.constexpr,
    MASK_KIND: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Mask a tile of scores (already scaled to exp2 units). qi, kj: query and key indices
    broadcast to the tile's shape ((BM, 1) and (1, BN), or transposed for the dK/dV pass)."""
    if MASK_KIND == 1:
        keep = tl.load(MASK + qi * smm + kj * smn, mask=(qi < L) & (kj < S), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        add = tl.load(MASK + qi * smm + kj * smn, mask=(qi < L) & (kj < S), other=0.0)
        s = s + add.to(s.dtype) * RLN
    if IS_CAUSAL:
        s = tl.where(kj <= qi, s, float("-inf"))
    if not EVEN_N:
        s = tl.where(kj < S, s, float("-inf"))
    return s


@triton.jit
def _causal_hi(start_m, S, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """Keys a query block [start_m, start_m + BLOCK_M) can see: [0, hi)."""
    if IS_CAUSAL:
        return tl.minimum(S, start_m + BLOCK_M)
    else:
        return S


@triton.jit
def causal_full_hi(start_m, hi, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The end of the key blocks [0, full_hi) that every query of the block [start_m, ...) sees
    whole, so that they need no causal mask (key block [n, n + BLOCK_N) is seen whole by query
    start_m iff n + BLOCK_N - 1 <= start_m); the blocks from full_hi to hi are masked. Not
    causal: every block is mask-free of the causal kind (full_hi = hi)."""
    if IS_CAUSAL:
        return tl.minimum(hi, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        return hi


@triton.jit
def _fwd_block(
    start_n, q, tq, m_i, l_i, acc, mu_i, acc_a, acc_b,
    K, V, MASK, TK, TV, qk_scale, t_scale,
    skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
    offs_m, offs_n, offs_d, offs_e, L, S,
    E: tl.constexpr, EV: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL_HERE: tl.constexpr,
    EVEN_N: tl.constexpr, JVP: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax (and of the fused JVP); CAUSAL_HERE says whether
    this block straddles the diagonal and needs the causal mask. With TMA, K and V are tensor
    descriptors of this batch entry's (S, E) and (S, Ev) (rows and columns past them read 0)."""
    cols = start_n + offs_n
    col_ok = cols[None, :] < S
    if TMA:
        kT = tl.trans(K.load([start_n, 0]))
    else:
        kT = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
    s = scale_scores(tl.dot(q, kT, input_precision=PREC, out_dtype=ACC), qk_scale, q.dtype)
    s = _mask_scores(s, offs_m[:, None], cols[None, :], MASK, smm, smn, L, S,
                     RLN, MASK_KIND, CAUSAL_HERE, EVEN_N)  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = _exp(s - m_safe[:, None], NATURAL, ACCURATE)
    alpha = _exp(m_i - m_safe, NATURAL, ACCURATE)  # rescales what earlier blocks summed
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = V.load([start_n, 0])
    else:
        v = tl.load(V + cols[:, None] * svn + offs_e[None, :] * svd,
                    mask=(cols[:, None] < S) & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
    acc = acc * alpha[:, None]
    # (BM, BN) @ (BN, Dv)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC, out_dtype=ACC)
    if JVP:
        if HAS_TQ or HAS_TK:
            sd = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            if HAS_TQ:
                sd = tl.dot(tq, kT, sd, input_precision=PREC, out_dtype=ACC)  # Q̇ Kᵀ
            if HAS_TK:
                tkT = tl.load(TK + cols[None, :] * stkn + offs_d[:, None] * stkd,
                              mask=col_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
                sd = tl.dot(q, tkT, sd, input_precision=PREC, out_dtype=ACC)  # + Q K̇ᵀ
            ps = p * (sd * t_scale)
            mu_i = mu_i * alpha + tl.sum(ps, 1)
            acc_a = acc_a * alpha[:, None]
            acc_a = tl.dot(ps.to(v.dtype), v, acc_a, input_precision=PREC, out_dtype=ACC)
        if HAS_TV:
            tv_ptrs = TV + cols[:, None] * stvn + offs_e[None, :] * stvd
            tv = tl.load(tv_ptrs, mask=(cols[:, None] < S) & (offs_e[None, :] < EV), other=0.0)
            acc_b = acc_b * alpha[:, None]
            acc_b = tl.dot(p.to(tv.dtype), tv, acc_b, input_precision=PREC, out_dtype=ACC)
    return m_new, l_i, acc, mu_i, acc_a, acc_b


@triton.jit
def _attn_fwd(
    Q, K, V, MASK, TQ, TK, TV, SCALE,  # inputs
    OUT, LSE, ODOT, MU,  # outputs: (Zb, L, Ev), (Zb, L), (Zb, L, Ev), (Zb, L)
    sq0, sq1, sq2, sqm, sqd,
    sk0, sk1, sk2, skn, skd,
    sv0, sv1, sv2, svn, svd,
    sm0, sm1, sm2, smm, smn,
    stq0, stq1, stq2, stqm, stqd,
    stk0, stk1, stk2, stkn, stkd,
    stv0, stv1, stv2, stvn, stvd,
    Z1, Z2, L, S, TUNE_N,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
    JVP: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    F64: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    """TMA: K and V are read through tensor descriptors (Hopper's TMA unit) instead of pointer
    loads (see `_descriptor`)."""
    ACC = tl.float64 if F64 else tl.float32
    ROW_BYTES = (E + EV) * (K.dtype.element_ty.primitive_bitwidth // 8)  # a key and value row
    block_m, pid_b = grid_tile(S, ROW_BYTES, IS_CAUSAL, True)
    start_m = block_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    Q += _batch_offset(pid_b, Z1, Z2, sq0, sq1, sq2)
    K += _batch_offset(pid_b, Z1, Z2, sk0, sk1, sk2)
    V += _batch_offset(pid_b, Z1, Z2, sv0, sv1, sv2)
    MASK += _batch_offset(pid_b, Z1, Z2, sm0, sm1, sm2)
    if TMA:
        K = _descriptor(K, S, E, skn, BLOCK_N, BLOCK_D)
        V = _descriptor(V, S, EV, svn, BLOCK_N, BLOCK_DV)
    qk_scale = tl.load(SCALE).to(ACC)  # scale·log2(e) (scale when NATURAL)
    t_scale = tl.load(SCALE + 1).to(ACC)  # scale, for the score tangent

    row_ok = offs_m[:, None] < L
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)  # running row max (exp2 units)
    l_i = tl.zeros([BLOCK_M], ACC)  # running row sum of exp2(s - m)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)  # running Σ exp2(s - m) V
    # The JVP's state; small placeholders where a constexpr leaves it unused (the block step
    # passes them through untouched)
    tq, mu_i, acc_a, acc_b = q, l_i, l_i, l_i
    if JVP:
        if HAS_TQ:
            TQ += _batch_offset(pid_b, Z1, Z2, stq0, stq1, stq2)
            tq = tl.load(TQ + offs_m[:, None] * stqm + offs_d[None, :] * stqd,
                         mask=row_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
        if HAS_TK:
            TK += _batch_offset(pid_b, Z1, Z2, stk0, stk1, stk2)
        if HAS_TV:
            TV += _batch_offset(pid_b, Z1, Z2, stv0, stv1, stv2)
        if HAS_TQ or HAS_TK:
            mu_i = tl.zeros([BLOCK_M], ACC)  # running Σ p·ṡ
            acc_a = tl.zeros([BLOCK_M, BLOCK_DV], ACC)  # running (p∘ṡ) V
        if HAS_TV:
            acc_b = tl.zeros([BLOCK_M, BLOCK_DV], ACC)  # running p V̇

    hi = _causal_hi(start_m, S, BLOCK_M, IS_CAUSAL)
    full_hi = causal_full_hi(start_m, hi, BLOCK_N, IS_CAUSAL)
    # Blocks below the diagonal, then (causal only) those that straddle it: the causal mask
    # only where it can mask something.
    for start_n in range(0, full_hi, BLOCK_N):
        m_i, l_i, acc, mu_i, acc_a, acc_b = _fwd_block(
            start_n, q, tq, m_i, l_i, acc, mu_i, acc_a, acc_b,
            K, V, MASK, TK, TV, qk_scale, t_scale,
            skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
            offs_m, offs_n, offs_d, offs_e, L, S,
            E, EV, MASK_KIND, False, EVEN_N, JVP, HAS_TQ, HAS_TK, HAS_TV,
            NATURAL, ACCURATE, RLN, PREC, ACC, BLOCK_M, BLOCK_N, TMA,
        )  # fmt: skip
    if IS_CAUSAL:  # (without causality full_hi = hi: no second loop is compiled)
        for start_n in range(full_hi, hi, BLOCK_N):
            m_i, l_i, acc, mu_i, acc_a, acc_b = _fwd_block(
                start_n, q, tq, m_i, l_i, acc, mu_i, acc_a, acc_b,
                K, V, MASK, TK, TV, qk_scale, t_scale,
                skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
                offs_m, offs_n, offs_d, offs_e, L, S,
                E, EV, MASK_KIND, IS_CAUSAL, EVEN_N, JVP, HAS_TQ, HAS_TK, HAS_TV,
                NATURAL, ACCURATE, RLN, PREC, ACC, BLOCK_M, BLOCK_N, TMA,
            )  # fmt: skip

    empty = l_i == 0.0  # every key of the row masked
    l_1 = tl.where(empty, 1.0, l_i)
    if ACCURATE:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        inv_l = tl.math.div_rn(tl.full([BLOCK_M], 1.0, ACC), l_1)  # IEEE division
    else:
        inv_l = 1.0 / l_1
    inv_l = tl.where(empty, 0.0, inv_l)
    out = acc * inv_l[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    if ACCURATE:
        log_l = libdevice.log(l_1)
    elif NATURAL:
        log_l = tl.log(l_1)
    else:
        log_l = tl.log2(l_1)
    if LSE.dtype.element_ty == tl.float64:  # m + log l without rounding (kernels/lse.py)
        lse = m_safe.to(tl.float64) + log_l.to(tl.float64)
    else:
        lse = m_safe + log_l
    if not NATURAL:
        lse = lse * 0.6931471805599453  # ·ln 2
    lse = tl.where(empty, float("-inf"), lse)
    row_base = pid_b.to(tl.int64) * L
    o_ptrs = (row_base + offs_m[:, None]) * EV + offs_e[None, :]
    o_mask = row_ok & (offs_e[None, :] < EV)
    tl.store(OUT + o_ptrs, out.to(OUT.dtype.element_ty), mask=o_mask)
    tl.store(LSE + row_base + offs_m, lse.to(LSE.dtype.element_ty), mask=offs_m < L)
    if JVP:
        o_dot = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        if HAS_TQ or HAS_TK:
            mu = mu_i * inv_l
            o_dot = acc_a * inv_l[:, None] - mu[:, None] * out
            tl.store(MU + row_base + offs_m, mu.to(MU.dtype.element_ty), mask=offs_m < L)
        if HAS_TV:
            o_dot += acc_b * inv_l[:, None]
        tl.store(ODOT + o_ptrs, o_dot.to(ODOT.dtype.element_ty), mask=o_mask)


@triton.jit
def _jvp_block(
    start_n, q, tq, lse, lse_lo, mu, acc_a, acc_b, K, V, MASK, TK, TV, LSE,
    qk_scale, t_scale, skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
    offs_m, offs_n, offs_d, offs_e, L, S,
    E: tl.constexpr, EV: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL_HERE: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr, PREC: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block of `_attn_fwd_jvp` (CAUSAL_HERE: the block straddles the diagonal)."""
    cols = start_n + offs_n
    col_ok = cols[None, :] < S
    kT = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd,
                 mask=col_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
    s = scale_scores(tl.dot(q, kT, input_precision=PREC, out_dtype=ACC), qk_scale, q.dtype)
    s = _mask_scores(s, offs_m[:, None], cols[None, :], MASK, smm, smn, L, S,
                     RLN, MASK_KIND, CAUSAL_HERE, EVEN_N)  # fmt: skip
    p = _exp(minus_lse(s, lse[:, None], lse_lo[:, None], LSE, ACC), NATURAL, ACCURATE)
    if HAS_TQ or HAS_TK:
        v = tl.load(V + cols[:, None] * svn + offs_e[None, :] * svd,
                    mask=(cols[:, None] < S) & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
        sd = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if HAS_TQ:
            sd = tl.dot(tq, kT, sd, input_precision=PREC, out_dtype=ACC)  # Q̇ Kᵀ
        if HAS_TK:
            tkT = tl.load(TK + cols[None, :] * stkn + offs_d[:, None] * stkd,
                          mask=col_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
            sd = tl.dot(q, tkT, sd, input_precision=PREC, out_dtype=ACC)  # + Q K̇ᵀ
        ps = p * (sd * t_scale)
        mu += tl.sum(ps, 1)
        # (BM, BN) @ (BN, Dv)
        acc_a = tl.dot(ps.to(v.dtype), v, acc_a, input_precision=PREC, out_dtype=ACC)
    if HAS_TV:
        tv = tl.load(TV + cols[:, None] * stvn + offs_e[None, :] * stvd,
                     mask=(cols[:, None] < S) & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
        acc_b = tl.dot(p.to(tv.dtype), tv, acc_b, input_precision=PREC, out_dtype=ACC)
    return mu, acc_a, acc_b


@triton.jit
def _attn_fwd_jvp(
    Q, K, V, MASK, TQ, TK, TV, SCALE, OUT, LSE,  # inputs; OUT, LSE: (Zb, L, Ev), (Zb, L)
    ODOT, MU,  # outputs: (Zb, L, Ev), (Zb, L)
    sq0, sq1, sq2, sqm, sqd,
    sk0, sk1, sk2, skn, skd,
    sv0, sv1, sv2, svn, svd,
    sm0, sm1, sm2, smm, smn,
    stq0, stq1, stq2, stqm, stqd,
    stk0, stk1, stk2, stkn, stkd,
    stv0, stv1, stv2, stvn, stvd,
    Z1, Z2, L, S, TUNE_N,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    F64: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Ȯ = (P∘Ṡ)V − μ∘O + P V̇ and μ = rowsum(P∘Ṡ), with P = exp(S − lse) from the saved lse."""
    ACC = tl.float64 if F64 else tl.float32
    ROW_BYTES = (E + EV) * (K.dtype.element_ty.primitive_bitwidth // 8)  # a key and value row
    block_m, pid_b = grid_tile(S, ROW_BYTES, IS_CAUSAL, True)
    start_m = block_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    Q += _batch_offset(pid_b, Z1, Z2, sq0, sq1, sq2)
    K += _batch_offset(pid_b, Z1, Z2, sk0, sk1, sk2)
    V += _batch_offset(pid_b, Z1, Z2, sv0, sv1, sv2)
    MASK += _batch_offset(pid_b, Z1, Z2, sm0, sm1, sm2)
    qk_scale = tl.load(SCALE).to(ACC)
    t_scale = tl.load(SCALE + 1).to(ACC)
    row_ok = offs_m[:, None] < L
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
    tq = q  # a placeholder unless HAS_TQ
    if HAS_TQ:
        TQ += _batch_offset(pid_b, Z1, Z2, stq0, stq1, stq2)
        tq = tl.load(TQ + offs_m[:, None] * stqm + offs_d[None, :] * stqd,
                     mask=row_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
    if HAS_TK:
        TK += _batch_offset(pid_b, Z1, Z2, stk0, stk1, stk2)
    if HAS_TV:
        TV += _batch_offset(pid_b, Z1, Z2, stv0, stv1, stv2)
    row_base = pid_b.to(tl.int64) * L
    lse, lse_lo = load_lse(LSE, row_base + offs_m, offs_m < L, RLN, ACC)  # empty rows: p = 0
    mu = tl.zeros([BLOCK_M], ACC)
    acc_a = tl.zeros([BLOCK_M, BLOCK_DV], ACC)  # (P∘Ṡ) V
    acc_b = tl.zeros([BLOCK_M, BLOCK_DV], ACC)  # P V̇

    hi = _causal_hi(start_m, S, BLOCK_M, IS_CAUSAL)
    full_hi = causal_full_hi(start_m, hi, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, full_hi, BLOCK_N):  # below the diagonal: no causal mask
        mu, acc_a, acc_b = _jvp_block(
            start_n, q, tq, lse, lse_lo, mu, acc_a, acc_b, K, V, MASK, TK, TV, LSE,
            qk_scale, t_scale, skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
            offs_m, offs_n, offs_d, offs_e, L, S, E, EV, MASK_KIND, False, EVEN_N,
            HAS_TQ, HAS_TK, HAS_TV, NATURAL, ACCURATE, RLN, PREC, ACC, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    for start_n in range(full_hi, hi, BLOCK_N):
        mu, acc_a, acc_b = _jvp_block(
            start_n, q, tq, lse, lse_lo, mu, acc_a, acc_b, K, V, MASK, TK, TV, LSE,
            qk_scale, t_scale, skn, skd, svn, svd, smm, smn, stkn, stkd, stvn, stvd,
            offs_m, offs_n, offs_d, offs_e, L, S, E, EV, MASK_KIND, IS_CAUSAL, EVEN_N,
            HAS_TQ, HAS_TK, HAS_TV, NATURAL, ACCURATE, RLN, PREC, ACC, BLOCK_M, BLOCK_N,
        )  # fmt: skip

    o_ptrs = (row_base + offs_m[:, None]) * EV + offs_e[None, :]
    o_mask = row_ok & (offs_e[None, :] < EV)
    o_dot = acc_b
    if HAS_TQ or HAS_TK:
        out = tl.load(OUT + o_ptrs, mask=o_mask, other=0.0).to(ACC)
        o_dot += acc_a - mu[:, None] * out
        tl.store(MU + row_base + offs_m, mu.to(MU.dtype.element_ty), mask=offs_m < L)
    tl.store(ODOT + o_ptrs, o_dot.to(ODOT.dtype.element_ty), mask=o_mask)


@triton.jit
def _dkdv_block(
    start_m, k, v, dk, dv, Q, MASK, DO, LSE, DELTA, qk_scale, row_base,
    sqm, sqd, smm, smn, sdom, sdod, offs_m, offs_n, offs_d, offs_e, L, S,
    E: tl.constexpr, EV: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL_HERE: tl.constexpr,
    EVEN_M: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One query block of `_attn_bwd_dkdv` (CAUSAL_HERE: the block straddles the diagonal;
    TMA: Q and DO are tensor descriptors)."""
    rows = start_m + offs_m
    row_ok = rows[None, :] < L
    if TMA:
        qT = tl.trans(Q.load([start_m, 0]))
    else:
        qT = tl.load(Q + rows[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=row_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
    lse, lse_lo = load_lse(LSE, row_base + rows, rows < L, RLN, ACC)
    sT = scale_scores(tl.dot(k, qT, input_precision=PREC, out_dtype=ACC), qk_scale, k.dtype)
    sT = _mask_scores(sT, rows[None, :], offs_n[:, None], MASK, smm, smn, L, S,
                      RLN, MASK_KIND, CAUSAL_HERE, True)  # fmt: skip
    pT = _exp(minus_lse(sT, lse[None, :], lse_lo[None, :], LSE, ACC), NATURAL, ACCURATE)
    if not EVEN_M:
        pT = tl.where(row_ok, pT, 0.0)  # rows past L
    if TMA:
        do = DO.load([start_m, 0])
    else:
        do = tl.load(DO + rows[:, None] * sdom + offs_e[None, :] * sdod,
                     mask=(rows[:, None] < L) & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
    # (BN, BM) @ (BM, Dv)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC, out_dtype=ACC)
    delta = tl.load(DELTA + row_base + rows, mask=rows < L, other=0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)  # (BN, Dv) @ (Dv, BM)
    dsT = pT * (dpT - delta[None, :].to(ACC))
    # (BN, BM) @ (BM, D)
    dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PREC, out_dtype=ACC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, MASK, DO, SCALE, LSE, DELTA,  # LSE, DELTA: (Zb, L)
    DK, DV,  # outputs (Zb, S, E), (Zb, S, Ev)
    sq0, sq1, sq2, sqm, sqd,
    sk0, sk1, sk2, skn, skd,
    sv0, sv1, sv2, svn, svd,
    sm0, sm1, sm2, smm, smn,
    sdo0, sdo1, sdo2, sdom, sdod,
    Z1, Z2, L, S, TUNE_N,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_M: tl.constexpr,
    F64: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    """One key block per program, looping over query blocks; works on transposed tiles
    (keys × queries) so that Pᵀ and dSᵀ come out without a transpose. TMA: Q and dO are read
    through tensor descriptors (`_descriptor`)."""
    ACC = tl.float64 if F64 else tl.float32
    ROW_BYTES = (E + EV) * (Q.dtype.element_ty.primitive_bitwidth // 8)  # a query and dO row
    block_n, pid_b = grid_tile(L, ROW_BYTES, IS_CAUSAL, False)
    start_n = block_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    Q += _batch_offset(pid_b, Z1, Z2, sq0, sq1, sq2)
    K += _batch_offset(pid_b, Z1, Z2, sk0, sk1, sk2)
    V += _batch_offset(pid_b, Z1, Z2, sv0, sv1, sv2)
    MASK += _batch_offset(pid_b, Z1, Z2, sm0, sm1, sm2)
    DO += _batch_offset(pid_b, Z1, Z2, sdo0, sdo1, sdo2)
    if TMA:
        Q = _descriptor(Q, L, E, sqm, BLOCK_M, BLOCK_D)
        DO = _descriptor(DO, L, EV, sdom, BLOCK_M, BLOCK_DV)
    row_base = pid_b.to(tl.int64) * L
    qk_scale = tl.load(SCALE).to(ACC)
    key_ok = offs_n[:, None] < S
    k = tl.load(K + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=key_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
    v = tl.load(V + offs_n[:, None] * svn + offs_e[None, :] * svd,
                mask=key_ok & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    lo = 0
    full_lo = 0
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # queries i < start_n see none of these keys
        # from full_lo on, every query of a block sees all of these keys: no causal mask
        full_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, L)
        # (without causality lo = full_lo = 0: this loop is not compiled)
        for start_m in range(lo, full_lo, BLOCK_M):  # the blocks that straddle the diagonal
            dk, dv = _dkdv_block(
                start_m, k, v, dk, dv, Q, MASK, DO, LSE, DELTA, qk_scale, row_base,
                sqm, sqd, smm, smn, sdom, sdod, offs_m, offs_n, offs_d, offs_e, L, S,
                E, EV, MASK_KIND, IS_CAUSAL, EVEN_M, NATURAL, ACCURATE, RLN, PREC, ACC, TMA,
            )  # fmt: skip
    for start_m in range(full_lo, L, BLOCK_M):
        dk, dv = _dkdv_block(
            start_m, k, v, dk, dv, Q, MASK, DO, LSE, DELTA, qk_scale, row_base,
            sqm, sqd, smm, smn, sdom, sdod, offs_m, offs_n, offs_d, offs_e, L, S,
            E, EV, MASK_KIND, False, EVEN_M, NATURAL, ACCURATE, RLN, PREC, ACC, TMA,
        )  # fmt: skip
    dk = dk * tl.load(SCALE + 1).to(ACC)  # dK = scale·dSᵀ Q
    kv_base = pid_b.to(tl.int64) * S
    tl.store(DK + (kv_base + offs_n[:, None]) * E + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=key_ok & (offs_d[None, :] < E))  # fmt: skip
    tl.store(DV + (kv_base + offs_n[:, None]) * EV + offs_e[None, :], dv.to(DV.dtype.element_ty),
             mask=key_ok & (offs_e[None, :] < EV))  # fmt: skip


@triton.jit
def _dq_block(
    start_n, q, do, lse, lse_lo, delta, dq, K, V, MASK, LSE, qk_scale,
    skn, skd, svn, svd, smm, smn, offs_m, offs_n, offs_d, offs_e, L, S,
    E: tl.constexpr, EV: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL_HERE: tl.constexpr,
    EVEN_N: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One key block of `_attn_bwd_dq` (CAUSAL_HERE: the block straddles the diagonal; TMA: K
    and V are tensor descriptors)."""
    cols = start_n + offs_n
    col_ok = cols[None, :] < S
    if TMA:
        kT = tl.trans(K.load([start_n, 0]))
        vT = tl.trans(V.load([start_n, 0]))
    else:
        kT = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok & (offs_d[:, None] < E), other=0.0)  # fmt: skip
        vT = tl.load(V + cols[None, :] * svn + offs_e[:, None] * svd,
                     mask=col_ok & (offs_e[:, None] < EV), other=0.0)  # fmt: skip
    s = scale_scores(tl.dot(q, kT, input_precision=PREC, out_dtype=ACC), qk_scale, q.dtype)
    s = _mask_scores(s, offs_m[:, None], cols[None, :], MASK, smm, smn, L, S,
                     RLN, MASK_KIND, CAUSAL_HERE, EVEN_N)  # fmt: skip
    p = _exp(minus_lse(s, lse[:, None], lse_lo[:, None], LSE, ACC), NATURAL, ACCURATE)
    dp = tl.dot(do, vT, input_precision=PREC, out_dtype=ACC)  # (BM, Dv) @ (Dv, BN)
    ds = p * (dp - delta[:, None])
    # (BM, BN) @ (BN, D)
    dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PREC, out_dtype=ACC)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, MASK, DO, SCALE, LSE,
    DELTA,  # output (Zb, L): δ of these rows, for the dK/dV pass that runs after this one
    DQ,  # output (Zb, L, E)
    OUT,  # (Zb, L, Ev) contiguous
    sq0, sq1, sq2, sqm, sqd,
    sk0, sk1, sk2, skn, skd,
    sv0, sv1, sv2, svn, svd,
    sm0, sm1, sm2, smm, smn,
    sdo0, sdo1, sdo2, sdom, sdod,
    Z1, Z2, L, S, TUNE_N,
    E: tl.constexpr, EV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, EVEN_N: tl.constexpr,
    F64: tl.constexpr, NATURAL: tl.constexpr, ACCURATE: tl.constexpr, RLN: tl.constexpr,
    PREC: tl.constexpr, TMA: tl.constexpr = False,
):  # fmt: skip
    """One query block per program, looping over key blocks: dQ = scale·Σ_blocks dS K. The
    program first computes its rows' δ = rowsum(dO∘O) (FlashAttention-2, Alg. 2 line 4) and
    stores it for `_attn_bwd_dkdv`: one launch fewer than a separate preprocess pass. TMA: K
    and V are read through tensor descriptors (`_descriptor`)."""
    ACC = tl.float64 if F64 else tl.float32
    ROW_BYTES = (E + EV) * (K.dtype.element_ty.primitive_bitwidth // 8)  # a key and value row
    block_m, pid_b = grid_tile(S, ROW_BYTES, IS_CAUSAL, True)
    start_m = block_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    Q += _batch_offset(pid_b, Z1, Z2, sq0, sq1, sq2)
    K += _batch_offset(pid_b, Z1, Z2, sk0, sk1, sk2)
    V += _batch_offset(pid_b, Z1, Z2, sv0, sv1, sv2)
    MASK += _batch_offset(pid_b, Z1, Z2, sm0, sm1, sm2)
    DO += _batch_offset(pid_b, Z1, Z2, sdo0, sdo1, sdo2)
    if TMA:
        K = _descriptor(K, S, E, skn, BLOCK_N, BLOCK_D)
        V = _descriptor(V, S, EV, svn, BLOCK_N, BLOCK_DV)
    row_base = pid_b.to(tl.int64) * L
    qk_scale = tl.load(SCALE).to(ACC)
    row_ok = offs_m[:, None] < L
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=row_ok & (offs_d[None, :] < E), other=0.0)  # fmt: skip
    do = tl.load(DO + offs_m[:, None] * sdom + offs_e[None, :] * sdod,
                 mask=row_ok & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
    lse, lse_lo = load_lse(LSE, row_base + offs_m, offs_m < L, RLN, ACC)
    o = tl.load(OUT + (row_base + offs_m[:, None]) * EV + offs_e[None, :],
                mask=row_ok & (offs_e[None, :] < EV), other=0.0)  # fmt: skip
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + row_base + offs_m, delta, mask=offs_m < L)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = _causal_hi(start_m, S, BLOCK_M, IS_CAUSAL)
    full_hi = causal_full_hi(start_m, hi, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, full_hi, BLOCK_N):  # below the diagonal: no causal mask
        dq = _dq_block(
            start_n, q, do, lse, lse_lo, delta, dq, K, V, MASK, LSE, qk_scale,
            skn, skd, svn, svd, smm, smn, offs_m, offs_n, offs_d, offs_e, L, S,
            E, EV, MASK_KIND, False, EVEN_N, NATURAL, ACCURATE, RLN, PREC, ACC, TMA,
        )  # fmt: skip
    if IS_CAUSAL:  # (without causality full_hi = hi: no second loop is compiled)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq = _dq_block(
                start_n, q, do, lse, lse_lo, delta, dq, K, V, MASK, LSE, qk_scale,
                skn, skd, svn, svd, smm, smn, offs_m, offs_n, offs_d, offs_e, L, S,
                E, EV, MASK_KIND, IS_CAUSAL, EVEN_N, NATURAL, ACCURATE, RLN, PREC, ACC, TMA,
            )  # fmt: skip
    dq = dq * tl.load(SCALE + 1).to(ACC)  # dQ = scale·dS K
    tl.store(DQ + (row_base + offs_m[:, None]) * E + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < E))  # fmt: skip


def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in pairs
    ]


# Autotuned launchers for CUDA (the interpreter launches the plain kernels with small fixed
# tiles). Tuned per (sequence-length bucket, head dims, flags); a config that does not fit the
# shared memory is skipped by the autotuner. EVEN_* depend on the tile, hence the heuristics.
_TUNE_KEY = ["TUNE_N", "E", "EV", "MASK_KIND", "IS_CAUSAL", "F64", "NATURAL", "ACCURATE"]
_even_n = {"EVEN_N": lambda a: a["S"] % a["BLOCK_N"] == 0}
_even_m = {"EVEN_M": lambda a: a["L"] % a["BLOCK_M"] == 0}

# Candidate tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs on Hopper; the
# first of each list is the default when autotuning is off (float32 "tf32x3" dots use the same
# tiles; the autotuner skips those that overflow the shared memory). IEEE dots (float64, no
# tensor cores) use the small FMA tile below: large FMA tiles take minutes to compile.
FWD_CONFIGS = _configs([
    (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 4, 4),
])  # fmt: skip
# Three accumulators (O, (P∘Ṡ)V, PV̇): at head dim 128 smaller row tiles or more warps.
# (128, 32, 8, 3): the fastest fused forward + JVP at head dim 128 in the H200 tile sweep
# (2.00 against the autotuner's 2.13 ms, experiments/results/tile_sweep_h200.md).
JVP_CONFIGS = _configs([
    (64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 8, 2), (64, 32, 4, 2),
    (128, 32, 8, 3),
])  # fmt: skip
DKDV_CONFIGS = _configs([
    (32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (64, 64, 8, 2),
    (32, 128, 4, 5),
])  # fmt: skip
DQ_CONFIGS = _configs([
    (128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (64, 64, 8, 2),
    (128, 32, 4, 5),
])  # fmt: skip
FMA_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
# float32 with padded heads of 65-128 (split-precision dots: each operand is held in two or
# three pieces, so a tile takes several times the shared memory of a 16-bit one at the same
# head dim): every 16-bit tile above overflows an H100/H200's 227 KiB there. These fit (shared
# bytes at head dim 128, tf32x3 dots, sm_90 compile: forward 90-147 KiB, forward JVP 82-196,
# dK/dV 98-197, dQ 114-196); the last of each list is the smallest, should a GPU have less.
FWD_WIDE_FP32 = _configs([(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2)])
JVP_WIDE_FP32 = _configs([(32, 32, 4, 2), (64, 32, 4, 1), (32, 64, 4, 1), (16, 32, 4, 2)])
DKDV_WIDE_FP32 = _configs([(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)])
DQ_WIDE_FP32 = _configs([(64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 1), (32, 32, 4, 2)])


def wide_fp32(consts: dict) -> bool:
    """Whether a launch's constexprs are float32 (natural exp, not float64) with a padded head
    wider than the narrow float32 scheme's (`kernels.precision`): the case that takes the
    *_WIDE_FP32 tiles."""
    return (
        bool(consts["NATURAL"])
        and not consts["F64"]
        and max(consts["BLOCK_D"], consts["BLOCK_DV"]) > TF32X3_MAX_HEAD
    )


def _tiles(narrow: list[triton.Config], wide: list[triton.Config]) -> dict:
    """autotune arguments: both lists, pruned to the one that fits the launch (`candidates`)."""

    def prune(configs: list, named_args: dict, **kwargs: Any) -> list[triton.Config]:
        return wide if wide_fp32({**named_args, **kwargs}) else narrow

    return {"configs": narrow + wide, "prune_configs_by": {"early_config_prune": prune}}


def candidates(tuned: Any, consts: dict) -> list[triton.Config]:
    """The tiles an autotuned kernel below considers for a launch with constexprs `consts`."""
    return tuned.early_config_prune(tuned.configs, {}, **consts)


attn_fwd_tuned = triton.autotune(
    key=[*_TUNE_KEY, "JVP", "HAS_TQ", "HAS_TK", "HAS_TV", "TMA"],
    **_tiles(FWD_CONFIGS, FWD_WIDE_FP32),
)(triton.heuristics(_even_n)(_attn_fwd))
attn_fwd_jvp_tuned = triton.autotune(
    key=[*_TUNE_KEY, "HAS_TQ", "HAS_TK", "HAS_TV"], **_tiles(JVP_CONFIGS, JVP_WIDE_FP32)
)(triton.heuristics(_even_n)(_attn_fwd_jvp))
attn_fwd_dual_tuned = triton.autotune(
    key=[*_TUNE_KEY, "JVP", "HAS_TQ", "HAS_TK", "HAS_TV"], **_tiles(JVP_CONFIGS, JVP_WIDE_FP32)
)(
    triton.heuristics(_even_n)(_attn_fwd)
)  # the fused forward + JVP: three accumulators, so smaller tiles than the plain forward
attn_fwd_plain = triton.heuristics(_even_n)(_attn_fwd)
attn_fwd_jvp_plain = triton.heuristics(_even_n)(_attn_fwd_jvp)
attn_bwd_dkdv_tuned = triton.autotune(
    key=[*_TUNE_KEY, "TMA"], **_tiles(DKDV_CONFIGS, DKDV_WIDE_FP32)
)(triton.heuristics(_even_m)(_attn_bwd_dkdv))
attn_bwd_dkdv_plain = triton.heuristics(_even_m)(_attn_bwd_dkdv)
attn_bwd_dq_tuned = triton.autotune(key=[*_TUNE_KEY, "TMA"], **_tiles(DQ_CONFIGS, DQ_WIDE_FP32))(
    triton.heuristics(_even_n)(_attn_bwd_dq)
)
attn_bwd_dq_plain = triton.heuristics(_even_n)(_attn_bwd_dq)
