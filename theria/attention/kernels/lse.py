"""The saved row logsumexp, read back by every kernel that recomputes P = exp(S − lse).

With lse rounded to float32, the rows of the recomputed P sum to 1 only within |lse|·ε, and
the second-order formulas (Ṡ − μ, dP − δ) amplify that error with the logits' size: at
E = 8, scale = 10 (|S| ≈ 100) the double backward w.r.t. V had 4.7× the error of PyTorch's
float32 math path (docs/CONTRACT.md, "Accuracy at large logits"). So float32 inputs keep lse
in float64 (O(L) bytes; `theria.attention.triton_impl._stat_dtype`), and a kernel reads it
as two float32 numbers hi + lo and subtracts them one after the other:

    p = exp((s − hi) − lo)

s − hi is exact where it matters (Sterbenz: s within a factor of 2 of hi, i.e. the large
entries of P), so P carries the rounding error of |s − lse|, as the math path's
exp(s − max) does, not of |lse|. The `torch` backend does the same (`blockwise._safe`).
16-bit inputs keep a float32 lse (their own rounding dominates); float64 needs no split.

That argument needs the recomputed s to be the forward's s bit for bit, and the scaled score
`dot · scale` is where it was lost: the compiler (LLVM's NVPTX backend; Triton's default
`enable_fp_fusion`) contracts a multiply followed by a subtraction into one fused
multiply-add, so a pass that subtracts lse right after scaling computes fma(dot, scale, −hi),
the unrounded product. The forward took its row max of the rounded product whenever a select
stood between the multiply and the subtraction (the masking of a ragged key block), while the
dK/dV pass, which masks nothing there, fused. For the dominant entry of a row that is an
error of ulp(|s|)/2 in P (≈ 4e-6 at |s| ≈ 100): the gradient w.r.t. V had 2.5× the math
path's float32 error at E = 8, scale = 10, L = S = 33 on an H200, with IEEE, tf32x3 and
bf16x6 dots alike. `scale_scores` rounds the product once, explicitly, for float32 and
float64 on CUDA (also the score tangent Ṡ, from which μ is subtracted); the interpreter (numpy)
never contracts, and 16-bit inputs keep the fused form (their rounding dominates).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

try:  # the backend-neutral libdevice (Triton >= 3.0); older layouts kept it per backend
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

# The interpreter has no libdevice.mul_rn (and no contraction to prevent).
_ROUND_ON_DEVICE: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def scale_scores(x, scale, IN_DTYPE: tl.constexpr):
    """x · scale for a tile of raw dot products of inputs of IN_DTYPE, rounded once (never
    fused into a later subtraction) for float32 / float64 inputs on CUDA: see above."""
    if _ROUND_ON_DEVICE and (IN_DTYPE == tl.float32 or IN_DTYPE == tl.float64):  # noqa: SIM300
        return libdevice.mul_rn(x, scale)
    else:
        return x * scale


@triton.jit
def load_lse(LSE, offs, ok, RLN: tl.constexpr, ACC: tl.constexpr):
    """(hi, lo): lse[offs] in the scores' unit (times RLN), −inf (a row with no key) read as 0,
    split into ACC numbers hi + lo when LSE is float64 and ACC narrower (lo = 0 otherwise)."""
    x = tl.load(LSE + offs, mask=ok, other=0.0)
    x = tl.where(x == float("-inf"), 0.0, x)
    if LSE.dtype.element_ty == tl.float64:
        x = x * RLN
        hi = x.to(ACC)
        lo = (x - hi.to(tl.float64)).to(ACC)  # exactly 0 when ACC is float64
    else:
        hi = x.to(ACC) * RLN
        lo = tl.zeros_like(hi)
    return hi, lo


@triton.jit
def minus_lse(s, hi, lo, LSE, ACC: tl.constexpr):
    """s − lse for a tile of scores, given `load_lse`'s hi and lo already broadcast to the
    tile: (s − hi) − lo where lo can be nonzero, else s − hi (no extra op per score)."""
    r = s - hi
    if LSE.dtype.element_ty == tl.float64:  # noqa: SIM102 (static branches, one per constexpr)
        if ACC == tl.float32:  # noqa: SIM300
            r = r - lo
    return r
