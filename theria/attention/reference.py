"""The `reference` backend: softmax(Q Kᵀ·scale + mask)·V as an explicit composition of torch ops.

Every derivative of every order comes from autograd through these ops, so this backend is the
oracle the other backends are tested against. It materializes the (..., L, S) score matrix:
O(L·S) memory, for tests and small problems.

Rows whose every key is masked give a zero output and zero gradients (PyTorch's math path
does the same since 2.5 through its "safe softmax"). 16-bit inputs are computed in float32 and
the output rounded back, as PyTorch's math path does on the CPU (a float16 score overflows at
|S| > 65504); autograd casts the derivatives back through the same casts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from theria.attention.contract import Problem, mask_scores


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    problem: Problem,
    upcast: bool = True,
) -> Tensor:
    """Attention on canonical inputs (see `contract.canonicalize`): q (*B, L, E), k (*B, S, E),
    v (*B, S, Ev), with batch dims that broadcast; returns (*B, L, Ev).

    upcast=False computes 16-bit inputs in their own dtype (every op rounds to it): the
    "same-dtype computation" whose error the 2× accuracy rule allows twice over
    (`theria.bench.common.same_dtype_sdpa`)."""
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        m = mask.float() if mask is not None and mask.is_floating_point() else mask
        return reference_attention(q.float(), k.float(), v.float(), m, problem).to(q.dtype)
    s = (
        torch.matmul(q, k.transpose(-2, -1)) * problem.scale
    )  # (*B, L, E) @ (*B, E, S) -> (*B, L, S)
    s = mask_scores(s, mask, 0, problem)
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)  # (*B, L, 1): rows with no key left
    # Softmax of an all -inf row is NaN (and so is its gradient); give such rows zeros instead.
    p = torch.softmax(torch.where(dead, torch.zeros_like(s), s), dim=-1)
    p = torch.where(dead, torch.zeros_like(p), p)
    if problem.dropout_p > 0.0:
        # F.dropout keeps its mask in the autograd graph, so every derivative pass sees the
        # same mask: reverse mode of any order, and forward mode.
        p = F.dropout(p, p=problem.dropout_p, training=True)
    return torch.matmul(p, v)  # (*B, L, S) @ (*B, S, Ev) -> (*B, L, Ev)
