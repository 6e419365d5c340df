"""Triton kernels of the `triton` backend (imported lazily: Triton is optional).

    first_order.py   forward (O, lse), forward-mode JVP (Ȯ, μ; also fused with the forward),
                     backward (preprocess δ, then dK/dV and dQ passes)
    second_order.py  the JVP of the backward (double backward, forward-over-reverse)

Kernels see only pointers, strides and `tl.constexpr` tile sizes; `theria.attention.triton_impl`
checks, allocates and launches them.
"""

from __future__ import annotations

import torch

MAX_HEAD_DIM = 128  # widest E or Ev the first-order kernels take (wider: blockwise code)
TF32X3_MAX_HEAD = 64  # widest padded float32 head dim that gets tf32x3 dots (see precision)
# The first-order kernels put the flattened batch on grid axis 1, which CUDA caps at 65535.
MAX_GRID_BATCH = 65535


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
    (experiments/results/triton_first_order_h100.md, triton_hvp_h100.md). Wider float32 heads
    keep IEEE dots: the second-order tf32x3 tiles overflow the shared memory at 128. Shared by
    the first- and second-order kernels.
    float64 (the interpreter's checks) is IEEE; for 16-bit inputs the option does not apply."""
    if dtype == torch.float64 or (dtype == torch.float32 and block_e > TF32X3_MAX_HEAD):
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"
