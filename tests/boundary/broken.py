"""Deliberately broken attention paths: the probe must classify each of them correctly.

`Analytic` is softmax(q kᵀ/√E) v with a hand-written backward made of differentiable torch
ops (so double backward works) and no `jvp` (so forward mode must fail explicitly). Its
``mode`` breaks it on purpose:

    "ok"      correct, differentiable backward; no jvp
    "detach"  backward returns detached gradients: under create_graph=True they carry no graph
              (what turns MAML into FO-MAML without a word)
    "double"  first derivatives right, second derivatives doubled (straight-through trick:
              g.detach() + 2·(g − g.detach()) has g's value and 2·g's derivative)
    "drop_k"  backward returns None for k
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Analytic(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, v: Tensor, mode: str) -> Tensor:
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, L, E) @ (B, H, E, S)
        return torch.softmax(s, dim=-1) @ v  # (B, H, L, S) @ (B, H, S, E) -> (B, H, L, E)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        q, k, v, mode = inputs
        ctx.save_for_backward(q, k, v)
        ctx.mode = mode

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple:
        q, k, v = ctx.saved_tensors
        if ctx.mode == "detach":
            q, k, v, d_out = q.detach(), k.detach(), v.detach(), d_out.detach()
        scale = q.shape[-1] ** -0.5
        p = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)  # (B, H, L, S)
        dv = p.transpose(-2, -1) @ d_out  # (B, H, S, L) @ (B, H, L, E) -> (B, H, S, E)
        dp = d_out @ v.transpose(-2, -1)  # (B, H, L, E) @ (B, H, E, S) -> (B, H, L, S)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))  # softmax VJP, (B, H, L, S)
        dq = ds @ k * scale  # (B, H, L, S) @ (B, H, S, E) -> (B, H, L, E)
        dk = ds.transpose(-2, -1) @ q * scale  # (B, H, S, L) @ (B, H, L, E) -> (B, H, S, E)
        grads = [dq, dk, dv]
        if ctx.mode == "detach":
            grads = [g.detach() for g in grads]
        elif ctx.mode == "double":
            grads = [g.detach() + 2.0 * (g - g.detach()) for g in grads]
        elif ctx.mode == "drop_k":
            grads[1] = None
        return (*grads, None)


def analytic(mode: str):
    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return Analytic.apply(q, k, v, mode)

    attn.__name__ = f"analytic[{mode}]"
    return attn
