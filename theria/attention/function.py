"""The two autograd Functions behind the `torch` and `triton` backends.

    Attention          (q, k, v) -> (out, lse)   forward; `backward` calls AttentionBackward;
                                                  `jvp` is the forward-mode tangent
    AttentionBackward  (q, k, v, out, lse, dO) -> (dQ, dK, dV)
                                                  `backward` is the double-backward VJP and
                                                  `jvp` the forward-over-reverse product

Both take an `impl` with the four primitives of `blockwise.py` (forward, forward_jvp,
backward, backward_jvp): `blockwise` itself for the `torch` backend, the Triton kernels for
`triton`. They save only q, k, v, the output and the row logsumexp (plus dO for the second
Function): nothing of size L×S.

AttentionBackward's derivatives are total derivatives in (q, k, v, dO): `out` and `lse` are
functions of q, k, v, and `backward_jvp` differentiates through them, so both are taken as
constants by autograd (no gradient, tangent ignored). For third and higher orders (a
`create_graph=True` pass through the second-order step), AttentionBackward.backward recomputes
`out` and `lse` with graph and runs `blockwise.backward_jvp` under autograd, so every further
derivative comes from autograd through exact formulas (exact, but that pass keeps its blockwise
intermediates: O(L·S) memory at third order).

`setup_context` style with `generate_vmap_rule = True`, so torch.func (grad, vjp, jvp, vmap,
jacrev, jacfwd, hessian) composes with both.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from theria.attention import blockwise
from theria.attention.contract import Problem


class Attention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem, impl: Any
    ) -> tuple[Tensor, Tensor]:
        return impl.forward(q, k, v, mask, problem)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        q, k, v, mask, problem, impl = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.save_for_forward(q, k, v, mask, out, lse)
        ctx.problem, ctx.impl = problem, impl

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, _d_lse: Tensor | None) -> tuple:
        if d_out is None:
            return (None,) * 6
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv = AttentionBackward.apply(q, k, v, mask, out, lse, d_out, ctx.problem, ctx.impl)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx: Any, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, *_: Any) -> tuple:
        q, k, v, mask, out, lse = ctx.saved_tensors
        o_dot, _mu = ctx.impl.forward_jvp(q, k, v, mask, ctx.problem, out, lse, tq, tk, tv)
        return o_dot, None


class AttentionBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        out: Tensor,
        lse: Tensor,
        d_out: Tensor,
        problem: Problem,
        impl: Any,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return impl.backward(q, k, v, mask, problem, out, lse, d_out)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        q, k, v, mask, out, lse, d_out, problem, impl = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, mask, out, lse, d_out)
        ctx.save_for_forward(q, k, v, mask, out, lse, d_out)
        ctx.problem, ctx.impl = problem, impl

    @staticmethod
    def backward(ctx: Any, gq: Tensor | None, gk: Tensor | None, gv: Tensor | None) -> tuple:
        q, k, v, mask, out, lse, d_out = ctx.saved_tensors
        if gq is None and gk is None and gv is None:
            return (None,) * 9
        impl: Any = ctx.impl
        if torch.is_grad_enabled():
            # A graph is being built through this second-order step (third order and up):
            # recompute out and lse as differentiable functions of q, k, v and let autograd
            # record the blockwise formulas.
            impl = blockwise
            out, lse = blockwise.forward(q, k, v, mask, ctx.problem)
        hq, hk, hv, o_dot = impl.backward_jvp(
            q, k, v, mask, ctx.problem, out, lse, d_out, gq, gk, gv, None
        )
        return hq, hk, hv, None, None, None, o_dot, None, None

    @staticmethod
    def jvp(
        ctx: Any,
        tq: Tensor | None,
        tk: Tensor | None,
        tv: Tensor | None,
        _tmask: Tensor | None,
        _tout: Tensor | None,
        _tlse: Tensor | None,
        td_out: Tensor | None,
        *_: Any,
    ) -> tuple:
        q, k, v, mask, out, lse, d_out = ctx.saved_tensors
        dq_dot, dk_dot, dv_dot, _ = ctx.impl.backward_jvp(
            q, k, v, mask, ctx.problem, out, lse, d_out, tq, tk, tv, td_out
        )
        return dq_dot, dk_dot, dv_dot


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem, impl: ModuleType | Any
) -> Tensor:
    """Canonical-form attention through the Functions above; returns out (*B, L, Ev)."""
    out, _lse = Attention.apply(q, k, v, mask, problem, impl)
    return out
