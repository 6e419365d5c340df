"""Triton kernels of the `triton` backend (imported lazily: Triton is optional).

    first_order.py   forward (O, lse), forward-mode JVP (Ȯ, μ; also fused with the forward),
                     backward (preprocess δ, then dK/dV and dQ passes)
    second_order.py  the JVP of the backward (double backward, forward-over-reverse)
    schedule.py      which tile each program of a grid takes (causal: longest first, by L2
                     sections of heads)

Kernels see only pointers, strides and `tl.constexpr` tile sizes; `theria.attention.triton_impl`
checks, allocates and launches them.
"""

from __future__ import annotations

import os

import torch

MAX_HEAD_DIM = 128  # widest E or Ev the first-order kernels take (wider: blockwise code)
TF32X3_MAX_HEAD = 64  # widest padded float32 head dim of the narrow scheme (see precision)
# The first-order kernels put the flattened batch on grid axis 1, which CUDA caps at 65535.
MAX_GRID_BATCH = 65535
LOG2E = 1.4426950408889634  # log2(e) = 1/ln 2, so exp(x) = exp2(x·LOG2E)


def natural_exp(dtype: torch.dtype) -> bool:
    """Whether kernels on inputs of `dtype` take exp/log in natural units (float32, float64) or,
    for 16-bit inputs, exp2 of scores scaled by log2(e) (one multiply less per score; their own
    rounding dominates that of s·log2(e)). Shared by the first- and second-order kernels."""
    return dtype in (torch.float32, torch.float64)


def padded_head(*dims: int) -> int:
    """The kernels' tile width for head dims `dims` (E, Ev): the next power of two of the widest,
    at least 16 (the smallest tl.dot operand)."""
    return max(16, 1 << (max(dims) - 1).bit_length())


def precision(dtype: torch.dtype, block_e: int) -> str:
    """tl.dot's input_precision for inputs of `dtype` with padded head dims up to `block_e`.

    float32 with heads up to 64 wide: three TF32 tensor-core products (Triton's "tf32x3": each
    operand split into a TF32 head and tail, the tail·tail product dropped), which keeps float32
    within the 2×-of-PyTorch error rule (plain TF32 would not) at tensor-core speed. IEEE float32
    dots run on the FMA units: 3× slower for a forward + backward and 31× for an HVP at N=4096
    on an H100, and their long FMA chains put the float32 JVP past the 2× rule there
    (experiments/results/triton_first_order_h100.md, triton_hvp_h100.md).
    float32 with heads of 65-128: "bf16x6" (each operand split into three bfloat16 pieces, six
    of the nine products kept). tf32x3 misses the 2× rule there (dQ 2.85× at head dim 128,
    HVP 2.4-2.8× on an H200); bf16x6 keeps every first-order quantity at 0.3-1.1× PyTorch's
    float32 error, and with the wide-head tiles of `first_order` a forward + backward takes
    0.55-0.83× the torch backend's time (experiments/results/fp32_wide_heads_h200.md). Shared
    by the first- and second-order kernels. Those are the defaults; THERIA_FP32_DOTS and
    THERIA_FP32_WIDE_DOTS choose others for measurements (below).
    float64 (the interpreter's checks) is IEEE; for 16-bit inputs the option does not apply."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return _FP32_DOTS[0] if block_e <= TF32X3_MAX_HEAD else _FP32_DOTS[1]
    return "tf32"


# float32 dot schemes (heads ≤ 64, wider heads). The environment variables THERIA_FP32_DOTS
# and THERIA_FP32_WIDE_DOTS override them, read once at import, for measuring other schemes
# (Triton's "bf16x3" / "bf16x6" split each operand into bf16 pieces); the interpreter, whose
# dots are numpy float32 products whatever the option, accepts only tf32x3 and ieee.
_SCHEMES = ("tf32x3", "ieee", "bf16x3", "bf16x6")


def _fp32_dots() -> tuple[str, str]:
    got = []
    for name, default in (("THERIA_FP32_DOTS", "tf32x3"), ("THERIA_FP32_WIDE_DOTS", "bf16x6")):
        value = os.environ.get(name, default)
        if value not in _SCHEMES:
            raise ValueError(f"{name}={value!r}: expected one of {_SCHEMES}")
        if os.environ.get("TRITON_INTERPRET") == "1" and value.startswith("bf16"):
            value = "tf32x3"
        got.append(value)
    return got[0], got[1]


_FP32_DOTS = _fp32_dots()
