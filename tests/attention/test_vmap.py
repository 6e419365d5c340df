"""theria.sdpa under torch.func.vmap: the Functions' own vmap rules fold the vmapped dim into
the batch of one call. Checked in float64 against a Python loop over the samples (outputs,
gradients through plain autograd outside vmap, double backward, forward mode) for batched and
unbatched q, k, v and masks, and, through Triton's interpreter, that the kernels see the
folded batch (no fallback to the blockwise code)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import vmap

import theria
from tests.attention.cases import BLOCK, CASES, Case


def _close(a, b) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def _stack(case: Case, n: int, batched: tuple[bool, bool, bool]):
    q, k, v, kw = case.build(torch.float64)
    out = []
    for t, b in zip((q, k, v), batched, strict=True):
        out.append(torch.stack([torch.randn_like(t) for _ in range(n)]) if b else t)
    return out, kw


IN_DIMS = [(0, 0, 0), (0, None, None), (None, 0, 0), (0, 0, None)]


@pytest.mark.parametrize("in_dims", IN_DIMS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_vmap_forward_and_grads_equal_a_loop(case: Case, in_dims: tuple) -> None:
    n = 3
    (q, k, v), kw = _stack(case, n, tuple(d is not None for d in in_dims))
    for t in (q, k, v):
        t.requires_grad_(True)

    def f(q, k, v):
        return theria.sdpa(q, k, v, backend="torch", block_size=BLOCK, **kw)

    out = vmap(f, in_dims=in_dims)(q, k, v)
    pick = lambda t, d, i: t if d is None else t[i]  # noqa: E731
    ref = torch.stack(
        [f(*(pick(t, d, i) for t, d in zip((q, k, v), in_dims, strict=True))) for i in range(n)]
    )
    _close(out, ref)
    # plain autograd outside vmap, first and second order (MAML's pattern)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sin().sum(), (q, k, v), create_graph=True)
    g_ref = torch.autograd.grad((ref * w).sin().sum(), (q, k, v), create_graph=True)
    for a, b in zip(g, g_ref, strict=True):
        _close(a, b)
    u = [torch.randn_like(t) for t in g]
    h = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, u, strict=True)), (q, k, v))
    h_ref = torch.autograd.grad(
        sum((a * b).sum() for a, b in zip(g_ref, u, strict=True)), (q, k, v)
    )
    for a, b in zip(h, h_ref, strict=True):
        _close(a, b)


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_vmap_of_grad_and_jvp_equal_a_loop(case: Case) -> None:
    """torch.func inside vmap (the per-sample gradient and JVP compositions)."""
    n = 2
    (q, k, v), kw = _stack(case, n, (True, True, False))

    def loss(q, k, v):
        return theria.sdpa(q, k, v, backend="torch", block_size=BLOCK, **kw).square().sum()

    g = vmap(torch.func.grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, None))(q, k, v)
    for i in range(n):
        gi = torch.func.grad(loss, argnums=(0, 1, 2))(q[i], k[i], v)
        for a, b in zip(g, gi, strict=True):
            _close(a[i], b)
    tq = torch.randn_like(q)
    jv = vmap(lambda q, t: torch.func.jvp(lambda x: loss(x, k[0], v), (q,), (t,))[1])(q, tq)
    for i in range(n):
        _close(jv[i], torch.func.jvp(lambda x: loss(x, k[0], v), (q[i],), (tq[i],))[1])


def test_vmap_with_batched_mask() -> None:
    q, k, v = (torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    masks = torch.rand(4, 2, 5, 5) > 0.4
    masks[..., 0] = True

    def f(m):
        return theria.sdpa(q, k, v, attn_mask=m, backend="torch", block_size=BLOCK)

    out = vmap(f)(masks)
    _close(out, torch.stack([f(m) for m in masks]))


@pytest.mark.triton_interpret
def test_vmap_runs_the_kernels_on_the_folded_batch() -> None:
    """Under vmap the Triton backend gets plain tensors (no 'torch.func' fallback warning),
    and its results equal the blockwise backend's."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported")
    from theria import _warnings

    _warnings.forget("triton:torch.func")
    q, k, v = (torch.randn(3, 2, 6, 8, requires_grad=True) for _ in range(3))

    def loss(backend):
        f = lambda q, k, v: theria.sdpa(q, k, v, is_causal=True, backend=backend)  # noqa: E731
        out = vmap(f)(q, k, v)
        g = torch.autograd.grad(out.sin().sum(), (q, k, v), create_graph=True)
        return (out, *g, *torch.autograd.grad(sum(x.square().sum() for x in g), (q, k, v)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = loss("triton")
    for a, b in zip(got, loss("torch"), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)
