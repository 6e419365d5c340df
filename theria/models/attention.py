"""Attention paths a model can be built with, by name.

    theria         theria.sdpa, backend "auto" (Triton for CUDA inputs in 16-bit, or float32
                   with heads up to 64 wide; else "torch")
    theria_torch   theria.sdpa, backend "torch" (blockwise autograd Functions)
    theria_triton  theria.sdpa, backend "triton" (CUDA, or the CPU under TRITON_INTERPRET=1)
    reference      theria.sdpa, backend "reference" (explicit composition; the oracle)
    sdpa           F.scaled_dot_product_attention, PyTorch's default dispatch (fused kernels:
                   no double backward, so MAML's second-order step raises through it)
    sdpa_math      F.scaled_dot_product_attention inside sdpa_kernel(SDPBackend.MATH)

Adding a path is one entry in `_THERIA_BACKENDS` (a theria backend) or in `attention_fn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from theria.attention import DEFAULT_BLOCK_SIZE, sdpa

AttentionFn = Callable[[Tensor, Tensor, Tensor, bool], Tensor]  # (q, k, v, is_causal) -> out

_THERIA_BACKENDS = {
    "theria": "auto",
    "theria_torch": "torch",
    "theria_triton": "triton",
    "reference": "reference",
}
ATTENTION_PATHS: tuple[str, ...] = (*_THERIA_BACKENDS, "sdpa", "sdpa_math")


def attention_fn(name: str, block_size: int = DEFAULT_BLOCK_SIZE) -> AttentionFn:
    """The attention function called `name` (see the module docstring): q, k, v of shape
    (B, H, L, Dh) -> (B, H, L, Dh)."""
    if name in _THERIA_BACKENDS:
        backend = _THERIA_BACKENDS[name]

        def theria_attn(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
            return sdpa(q, k, v, is_causal=is_causal, backend=backend, block_size=block_size)

        return theria_attn
    if name == "sdpa":

        def torch_attn(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

        return torch_attn
    if name == "sdpa_math":

        def math_attn(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> Tensor:
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

        return math_attn
    raise ValueError(f"attn must be one of {ATTENTION_PATHS}; got {name!r}")
