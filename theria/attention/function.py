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
functions of q, k, v, and `backward_jvp` differentiates through them, so the Function gives them
no gradient and ignores their tangents. Both are still passed as graph-connected tensors (saved
outputs of Attention, and `lse` is a differentiable output): when autograd records a graph
*through* a second-order step (third and higher orders, or reverse-over-forward), the recorded
blockwise ops reach back through `out` and `lse` into Attention, so every further derivative is
exact. Such recorded steps run the differentiable `blockwise` ops (a kernel is not differentiable)
and keep their blockwise intermediates: O(L·S) memory at that order.

`setup_context` style, so torch.func (grad, vjp, jvp, vmap, jacrev, jacfwd, hessian) composes
with both. Under `torch.func.vmap` each Function's own `vmap` rule moves the vmapped dim to the
front of every input as one more batch dim (unbatched inputs get a size-1 or expanded one) and
calls the Function once on the plain tensors: the kernels see one launch for the whole vmapped
batch (say, every task of a meta-batch), and autograd records one node for it, whose backward
and double backward are the same kernels again.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad

from theria._engine import tangents_may_be_differentiated
from theria.attention import blockwise
from theria.attention.contract import Problem


def _impl_for(impl: Any, *tensors: Tensor | None) -> Any:
    """The implementation for a derivative step: `impl`, unless autograd is recording a graph
    through this step (a higher-order composition), in which case the differentiable torch ops
    of `blockwise` (kernels are not differentiable). Under torch.func transforms the blockwise
    ops are always used by the torch backend, and are tracked by the outer levels."""
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return blockwise if recording else impl


def _carries_tangent(*tensors: Tensor | None) -> bool:
    """Whether a forward-mode dual level is open and one of `tensors` carries a tangent at it.
    A Function's backward run on such tensors (forward-over-reverse through a gradient taken
    with create_graph=True, e.g. an HVP of a MAML objective) must be computed with ops that
    forward AD tracks: kernels would drop the tangent silently."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _nothing_to_record(*tensors: Tensor | None) -> bool:
    """Whether a step on `tensors` taken now needs no autograd Function around it: no graph is
    recorded (grad mode off, as in a backward without create_graph or under no_grad, or no
    input requires grad), no forward-mode dual level is open (forward AD ignores grad mode and
    would carry tangents through it), no torch.func transform is active and torch.compile is
    not tracing. Then Function.apply would only add its bookkeeping (~10-15 µs of host time per
    call on a 2-core CPU host) to the implementation's own call."""
    return not (
        (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
        or forward_ad._current_level >= 0
        or torch._C._are_functorch_transforms_active()
        or torch.compiler.is_compiling()
    )


def _reject_mask_tangent(t_mask: Tensor | None) -> None:
    """The mask is a constant of these Functions: a tangent on it would be silently dropped."""
    if t_mask is not None:
        raise NotImplementedError(
            "theria.sdpa: forward-mode AD with respect to a float attn_mask is not supported by "
            "the torch/triton backends; use backend='reference' (or backend='auto', which falls "
            "back to it for a mask that carries a tangent outside torch.func)"
        )


def _reject_nested_forward() -> None:
    """Forward-over-forward through a custom Function's `jvp` is silently wrong in torch.func
    (the inner `jvp` runs below the outer forward level, so the outer level never sees how the
    inner tangent depends on the primals). Refuse it loudly instead."""
    try:
        from torch._C._functorch import TransformType, get_interpreter_stack
    except ImportError:  # pragma: no cover - older or newer torch without this API
        return
    stack = get_interpreter_stack() or []
    if sum(1 for level in stack if level.key() == TransformType.Jvp) > 1:
        raise NotImplementedError(
            "theria.sdpa: forward-over-forward AD (jvp of jvp, jacfwd of jacfwd) is not "
            "supported by the torch/triton backends: torch.func would silently drop the outer "
            "derivative of a custom Function's jvp. Use forward-over-reverse (jacfwd(jacrev), "
            "hessian) or reverse-over-forward, or backend='reference'."
        )


def _to_front(x: Tensor | None, d: int | None, n: int, rank: int, expand: bool) -> Tensor | None:
    """`x` under vmap (vmapped dim `d`, None when unbatched) as a plain tensor (n | 1, *pad,
    *x's per-sample shape) of `rank` + 1 dims: the vmapped dim leads, as one more batch dim,
    and size-1 dims pad the per-sample shape on the left to `rank` dims (the batch dims of
    the canonical form broadcast from the right). Unbatched: a size-1 leading dim, or, with
    `expand`, a stride-0 dim of size n (a view: per-sample gradients stay apart)."""
    if x is None:
        return None
    if d is not None:
        x = x.movedim(d, 0)
        sample = x.shape[1:]
    else:
        sample = x.shape
        x = x.unsqueeze(0)
        if expand:
            x = x.expand(n, *sample)
    return x.reshape(x.shape[0], *(1,) * (rank - len(sample)), *sample)


def _sample_rank(*tensors: tuple[Tensor | None, int | None]) -> int:
    """The largest per-sample rank among (tensor, vmapped dim) pairs."""
    return max(t.dim() - (d is not None) for t, d in tensors if t is not None)


class Attention(torch.autograd.Function):
    @staticmethod
    def forward(
        q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem, impl: Any
    ) -> tuple[Tensor, Tensor]:
        return impl.forward(q, k, v, mask, problem)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        q, k, v, mask, problem, impl = inputs
        out, lse = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.save_for_forward(q, k, v, mask, out, lse)
        ctx.problem, ctx.impl = problem, impl

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_lse: Tensor | None) -> tuple:
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq = dk = dv = None
        if d_out is not None:
            if _nothing_to_record(q, k, v, d_out):  # a plain backward: gradients only
                dq, dk, dv = ctx.impl.backward(q, k, v, mask, ctx.problem, out, lse, d_out)
            else:  # a graph (double backward) or a tangent (forward-over-reverse) goes on
                dq, dk, dv = AttentionBackward.apply(
                    q, k, v, mask, out, lse, d_out, ctx.problem, ctx.impl
                )
        if d_lse is not None:
            # Only reverse-over-forward compositions reach this (the tangent of `out` depends
            # on lse). Plain differentiable torch ops; `lse` is a saved output, so a graph built
            # through here reaches back into this Function.
            dq_l, dk_l = blockwise.lse_backward(q, k, mask, ctx.problem, lse, d_lse)
            dq = dq_l if dq is None else dq + dq_l
            dk = dk_l if dk is None else dk + dk_l
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(
        ctx: Any, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None, t_mask: Any, *_: Any
    ) -> tuple:
        _reject_mask_tangent(t_mask)
        _reject_nested_forward()
        q, k, v, mask, out, lse = ctx.saved_tensors
        # a graph recorded through the tangent serves reverse-over-forward only: not needed
        # where the caller promises no reverse pass differentiates it (forward-over-reverse)
        impl = ctx.impl
        if tangents_may_be_differentiated():
            impl = _impl_for(impl, q, k, v, out, tq, tk, tv)
        o_dot, mu = impl.forward_jvp(q, k, v, mask, ctx.problem, out, lse, tq, tk, tv)
        return o_dot, torch.zeros_like(lse) if mu is None else mu

    @staticmethod
    def vmap(info: Any, in_dims: tuple, q, k, v, mask, problem, impl) -> tuple:
        """torch.func.vmap: the vmapped dim becomes a leading batch dim of one call."""
        qd, kd, vd, md = in_dims[:4]
        n = info.batch_size
        r = _sample_rank((q, qd), (k, kd), (v, vd))  # (*B, N, E): batch dims + 2
        if mask is not None:
            r = max(r, mask.dim() - (md is not None))
        # Unbatched inputs broadcast (size 1): the one node's backward sums their gradient
        # over the vmapped dim, which is their gradient. Key and value keep equal batch dims,
        # and a batched mask gets a query of its own batch (the output's batch is q's and k's).
        kv_batched = kd is not None or vd is not None
        expand = (md is not None, kv_batched, kv_batched, False)
        args = [
            _to_front(t, d, n, r, e)
            for (t, d), e in zip(((q, qd), (k, kd), (v, vd), (mask, md)), expand, strict=True)
        ]
        out, lse = Attention.apply(*args, problem, impl)  # (n, *B, L, Ev), (n, *B, L)
        return (out, lse), (0, 0)


class AttentionBackward(torch.autograd.Function):
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
        impl = _impl_for(ctx.impl, q, k, v, d_out, gq, gk, gv)
        # forward AD through this step: differentiable ops. Checked here, not in _impl_for:
        # the engine hands this backward dual tensors, while the jvp methods only ever get
        # tangent-free primals, so the check would be wasted work on their (hot) path
        if _carries_tangent(q, k, v, mask, out, lse, d_out, gq, gk, gv):
            impl = blockwise
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
        t_mask: Tensor | None,
        _tout: Tensor | None,
        _tlse: Tensor | None,
        td_out: Tensor | None,
        *_: Any,
    ) -> tuple:
        _reject_mask_tangent(t_mask)
        _reject_nested_forward()
        q, k, v, mask, out, lse, d_out = ctx.saved_tensors
        impl = _impl_for(ctx.impl, q, k, v, d_out, tq, tk, tv, td_out)
        # The tangents of out and lse are Ȯ and μ, the first pass of backward_jvp.
        stats = {}
        if getattr(impl, "REUSES_TANGENT_STATS", False) and _tout is not None:
            stats = {"o_dot": _tout, "mu": _tlse}
        dq_dot, dk_dot, dv_dot, _ = impl.backward_jvp(
            q, k, v, mask, ctx.problem, out, lse, d_out, tq, tk, tv, td_out, **stats
        )
        return dq_dot, dk_dot, dv_dot

    @staticmethod
    def vmap(info: Any, in_dims: tuple, q, k, v, mask, out, lse, d_out, problem, impl) -> tuple:
        """torch.func.vmap: one call over the vmapped dim as a leading batch dim. Unbatched
        q, k, v, dO (and out, lse) are expanded (views), so each sample gets its own gradient."""
        n = info.batch_size
        pairs = list(zip((q, k, v, mask, out, lse, d_out), in_dims[:7], strict=True))
        r = _sample_rank(*pairs[:3], pairs[4], pairs[6])  # batch dims + 2
        if mask is not None:
            r = max(r, mask.dim() - (in_dims[3] is not None))
        ranks = (r, r, r, r, r, r - 1, r)  # lse (*B, L) has one dim less
        args = [  # the mask broadcasts; every other input is expanded (views)
            _to_front(t, d, n, rank, expand=i != 3)
            for i, ((t, d), rank) in enumerate(zip(pairs, ranks, strict=True))
        ]
        grads = AttentionBackward.apply(*args, problem, impl)
        # back to each input's per-sample shape (drop the padding dims)
        shapes = [t.shape if d is None else t.movedim(d, 0).shape[1:] for t, d in pairs[:3]]
        return tuple(g.reshape(n, *s) for g, s in zip(grads, shapes, strict=True)), (0, 0, 0)


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, problem: Problem, impl: ModuleType | Any
) -> Tensor:
    """Canonical-form attention through the Functions above; returns out (*B, L, Ev). A call
    that records nothing (inference, evaluation under no_grad) calls `impl.forward` directly."""
    if _nothing_to_record(q, k, v, mask):
        return impl.forward(q, k, v, mask, problem)[0]
    out, _lse = Attention.apply(q, k, v, mask, problem, impl)
    return out


class _PositionalSignature(inspect.Signature):
    """A forward's signature whose `bind` of exactly one positional value per parameter (how
    theria always calls `apply`) returns at once.

    torch.autograd.Function.apply binds its arguments through inspect.signature(forward) on
    every call when setup_context is defined (to fill in defaults). That costs ~5 µs of Python
    per call on a 2-core CPU host (measured), twice per forward + backward; with every
    argument given positionally its result is those arguments unchanged, so that case skips
    it. Any other call (keywords, defaults) binds as inspect does."""

    __slots__ = ()

    def bind(self, /, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and len(args) == len(self.parameters):
            return _Bound(args)
        return super().bind(*args, **kwargs)


class _Bound:
    """What torch reads of a BoundArguments: args, kwargs, apply_defaults()."""

    __slots__ = ("args",)
    kwargs: dict[str, Any] = {}  # noqa: RUF012 - read-only, never mutated

    def __init__(self, args: tuple) -> None:
        self.args = args

    def apply_defaults(self) -> None:
        """Every parameter is bound already."""


for _fn in (Attention.forward, AttentionBackward.forward):
    _sig = inspect.signature(_fn)
    _fn.__signature__ = _PositionalSignature(  # type: ignore[attr-defined]
        list(_sig.parameters.values()), return_annotation=_sig.return_annotation
    )
