"""Every derivative of the `torch` backend, in float64, against finite differences and the
`reference` backend: gradcheck, gradgradcheck, forward AD, batched grads, torch.func
compositions (second and third order), and the HVP modes of theria.autodiff."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import theria
from tests.attention.cases import BLOCK, CASES, Case
from theria import _warnings, autodiff


def _fn(backend: str, kw: dict):
    return functools.partial(theria.sdpa, backend=backend, block_size=BLOCK, **kw)


def _inputs(case: Case):
    q, k, v, kw = case.build(torch.float64)
    return tuple(t.requires_grad_(True) for t in (q, k, v)), kw


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_and_forward_ad(case: Case) -> None:
    args, kw = _inputs(case)
    assert torch.autograd.gradcheck(
        _fn("torch", kw), args, check_forward_ad=True, check_batched_grad=True
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradgradcheck(case: Case) -> None:
    args, kw = _inputs(case)
    # check_fwd_over_rev: the forward-over-reverse path (AttentionBackward.jvp) as well.
    assert torch.autograd.gradgradcheck(
        _fn("torch", kw), args, check_fwd_over_rev=True, check_batched_grad=True
    )


def _loss(backend: str, kw: dict):
    """A scalar with a non-trivial Hessian through the attention output."""
    f = _fn(backend, kw)

    def loss(q, k, v):
        out = f(q, k, v)
        return (out.sin() * out).sum() + 0.3 * (out**2).sum()

    return loss


def _close(a, b) -> None:
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


COMPOSITIONS = {
    "jvp(grad)": lambda f, q, k, v, t: jvp(grad(f, argnums=(0, 1, 2)), (q, k, v), t)[1],
    "jacfwd(jacrev)": lambda f, q, k, v, t: jacfwd(jacrev(f, argnums=0), argnums=0)(q, k, v),
    "jacrev(jacrev)": lambda f, q, k, v, t: jacrev(jacrev(f, argnums=1), argnums=1)(q, k, v),
    "jacrev(jacfwd)": lambda f, q, k, v, t: jacrev(jacfwd(f, argnums=0), argnums=0)(q, k, v),
    "hessian(k)": lambda f, q, k, v, t: hessian(f, argnums=1)(q, k, v),
    "vmap(grad)": lambda f, q, k, v, t: vmap(grad(f, argnums=(0, 1, 2)))(q, k, v),
}

FORWARD_OVER_FORWARD = {
    "jacfwd(jacfwd)": lambda f, q, k, v, t: jacfwd(jacfwd(f, argnums=0), argnums=0)(q, k, v),
    "jvp(jvp)": lambda f, q, k, v, t: jvp(lambda q: jvp(f, (q, k, v), t)[1], (q,), (t[0],))[1],
    "jacfwd(jacfwd(jacrev))": lambda f, q, k, v, t: jacfwd(jacfwd(jacrev(f)))(q, k, v),
}


@pytest.mark.parametrize("name", FORWARD_OVER_FORWARD)
def test_forward_over_forward_fails_loudly(name: str) -> None:
    """torch.func would silently drop the outer derivative of a custom Function's jvp (seen:
    errors of order 1 against the reference), so the backends refuse it."""
    q, k, v, kw = CASES[1].build(torch.float64)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        FORWARD_OVER_FORWARD[name](_loss("torch", kw), q, k, v, t)
    # The reference backend supports it (plain torch ops).
    FORWARD_OVER_FORWARD[name](_loss("reference", kw), q, k, v, t)


@pytest.mark.parametrize("name", COMPOSITIONS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_torch_func_compositions_match_reference(name: str, case: Case) -> None:
    q, k, v, kw = case.build(torch.float64)
    t = tuple(torch.randn_like(x) for x in (q, k, v))
    compose = COMPOSITIONS[name]
    _close(compose(_loss("torch", kw), q, k, v, t), compose(_loss("reference", kw), q, k, v, t))


THIRD_ORDER = {
    "rev(rev(rev))": lambda f: jacrev(jacrev(jacrev(f))),
    "fwd(rev(rev))": lambda f: jacfwd(jacrev(jacrev(f))),
    "rev(fwd(rev))": lambda f: jacrev(jacfwd(jacrev(f))),
}


@pytest.mark.parametrize("name", THIRD_ORDER)
def test_third_order_through_torch_func(name: str) -> None:
    q, k, v, kw = CASES[1].build(torch.float64)
    q = q[..., :2, :].contiguous()  # keep the third-order tensors small

    def f(backend):
        loss = _loss(backend, kw)
        return lambda q: loss(q, k, v)

    _close(THIRD_ORDER[name](f("torch"))(q), THIRD_ORDER[name](f("reference"))(q))


def test_third_order_through_autograd() -> None:
    args, kw = _inputs(CASES[3])
    u = tuple(torch.randn_like(x) for x in args)

    def third(backend):
        loss = _loss(backend, kw)(*args)
        g = torch.autograd.grad(loss, args, create_graph=True)
        h = torch.autograd.grad(
            sum((a * b).sum() for a, b in zip(g, u, strict=True)), args, create_graph=True
        )
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(h, u, strict=True)), args)

    _close(third("torch"), third("reference"))


def test_gradgradgradcheck_small() -> None:
    """Third order against finite differences of the (exact) second order."""
    args, kw = _inputs(CASES[0])
    f = _fn("torch", kw)
    u = torch.randn(2, 4, 2, dtype=torch.float64)

    def second(q, k, v):
        (gq,) = torch.autograd.grad((f(q, k, v) * u).sum(), q, create_graph=True)
        return gq

    assert torch.autograd.gradgradcheck(second, args)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[6]], ids=str)
def test_hvp_modes_agree_with_finite_differences(case: Case) -> None:
    q, k, v, kw = case.build(torch.float64)
    loss = _loss("torch", kw)
    errors = autodiff.check_hvp(loss, (q, k, v), eps=1e-5)
    # Central differences in float64 with eps=1e-5: truncation ~eps²·|f'''| and rounding
    # ~1e-16/eps; both well below 1e-7 here. The exact modes agree to rounding.
    assert errors["rev_vs_fwd"] < 1e-12, errors
    assert errors["rev_vs_fd"] < 1e-7 and errors["fwd_vs_fd"] < 1e-7, errors
    assert errors["symmetry"] < 1e-12, errors
    ref = autodiff.hvp(
        _loss("reference", kw), (q, k, v), tuple(torch.ones_like(x) for x in (q, k, v))
    )
    ours = autodiff.hvp(loss, (q, k, v), tuple(torch.ones_like(x) for x in (q, k, v)), "fwd_rev")
    _close(ours, ref)


def test_maml_style_meta_gradient_keeps_second_order_term() -> None:
    """grad(create_graph=True) then grad: the meta-gradient equals the reference backend's and
    differs from the first-order (detached) one."""
    torch.manual_seed(1)
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 4, dtype=torch.float64)

    def inner_loss(w, backend):
        h = x @ w
        return (theria.sdpa(h, h, h, is_causal=True, backend=backend, block_size=2) ** 2).mean()

    def meta_grad(backend, first_order=False):
        (g,) = torch.autograd.grad(inner_loss(w, backend), w, create_graph=not first_order)
        w1 = w - 0.5 * g
        (mg,) = torch.autograd.grad(inner_loss(w1, backend), w)
        return mg

    ours, ref = meta_grad("torch"), meta_grad("reference")
    _close(ours, ref)
    assert (ours - meta_grad("torch", first_order=True)).abs().max() > 1e-3


def test_blockwise_takes_float32_statistics_with_16bit_inputs() -> None:
    """The Triton kernels keep lse and μ in float32 for 16-bit inputs; when a step falls back
    to the blockwise code (a graph recorded through it), those statistics must be usable."""
    from theria.attention import blockwise
    from theria.attention.contract import Problem

    pr = Problem(scale=0.5, is_causal=True, block_size=3)
    q, k, v, do, tq = (torch.randn(2, 5, 4) for _ in range(5))
    out32, lse32 = blockwise.forward(q, k, v, None, pr)
    o_dot32, mu32 = blockwise.forward_jvp(q, k, v, None, pr, out32, lse32, tq, None, None)
    want = blockwise.backward_jvp(q, k, v, None, pr, out32, lse32, do, tq, None, None, None)
    h = [t.bfloat16() for t in (q, k, v, out32, do, tq, o_dot32)]
    got = blockwise.backward_jvp(
        h[0], h[1], h[2], None, pr, h[3], lse32, h[4], h[5], None, None, None, o_dot=h[6], mu=mu32
    )
    dq, dk = blockwise.lse_backward(h[0], h[1], None, pr, lse32, torch.ones_like(lse32))
    assert dq.dtype == dk.dtype == torch.bfloat16
    for a, b in zip(got[:3], want[:3], strict=True):
        assert a.dtype == torch.bfloat16
        # bfloat16 has an 8-bit mantissa: relative agreement to a few units of 2^-8
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_mask_tangent_is_never_dropped() -> None:
    """A forward-mode tangent on a float mask: the blockwise Functions treat the mask as a
    constant, so they must refuse it (explicit backend) or hand over to `reference` (auto)."""
    q, k, v = (torch.randn(2, 4, 3, dtype=torch.float64) for _ in range(3))
    m, tm = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)

    def tangent(backend):
        return jvp(lambda m: theria.sdpa(q, k, v, attn_mask=m, backend=backend), (m,), (tm,))[1]

    with pytest.raises(NotImplementedError, match="attn_mask"):
        tangent("torch")
    _warnings.forget()
    with pytest.warns(RuntimeWarning, match="reference"):
        _close(tangent("auto"), tangent("reference"))
