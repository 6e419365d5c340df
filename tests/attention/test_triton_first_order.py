"""The first-order Triton kernels (forward, JVP, backward) under TRITON_INTERPRET=1 on the CPU.

Checked in float64 and float32 against the `torch` (blockwise) and `reference` backends, on
small odd shapes: masks (key padding, dense bool with fully masked rows, additive float),
causal, GQA, broadcast batches, L != S, head dims that are not powers of two.

TRITON_INTERPRET must be set before the kernels are built (when
`theria.attention.kernels.first_order` is first imported): this module sets it at import,
which pytest does at collection, before any test runs.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import theria
from theria import _warnings
from theria.attention import triton_impl

pytestmark = pytest.mark.triton_interpret


@pytest.fixture(autouse=True)
def _interpreted() -> None:
    if not triton_impl.INTERPRET:
        pytest.skip(
            "TRITON_INTERPRET is not 1 in this process (set to 0, or the kernels were built "
            "before it was set): the interpreter tests need TRITON_INTERPRET=1"
        )


# (name, B, Hq, Hkv, L, S, E, Ev, mask kind, causal)
CASES = [
    ("plain", 1, 2, 2, 5, 7, 3, 4, None, False),
    ("causal-L>S", 2, 1, 1, 19, 11, 20, 9, None, True),
    ("causal-L<S", 1, 2, 2, 9, 23, 8, 8, None, True),
    ("key-padding", 2, 2, 2, 17, 21, 8, 6, "padding", False),
    ("dense-bool-empty-rows", 1, 2, 2, 13, 18, 5, 5, "dense", False),
    ("additive", 1, 2, 2, 11, 19, 7, 7, "float", False),
    ("gqa", 1, 4, 2, 10, 13, 6, 6, "padding", False),
]


def _inputs(case, dtype):
    _, B, Hq, Hkv, L, S, E, Ev, mask_kind, causal = case
    q = torch.randn(B, Hq, L, E, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, dtype=dtype)
    mask = None
    if mask_kind == "padding":  # key padding, broadcast over heads and queries: (B, 1, 1, S)
        lengths = torch.tensor([S, S - 5])[:B]
        mask = (torch.arange(S) < lengths[:, None])[:, None, None, :]
    elif mask_kind == "dense":  # full (B, H, L, S), with rows 0 and 4 fully masked
        mask = torch.rand(B, Hq, L, S) > 0.4
        mask[:, :, 0] = False
        mask[:, 1, 4] = False
    elif mask_kind == "float":  # additive, with -inf entries and one fully -inf row
        mask = torch.randn(B, Hq, L, S, dtype=dtype)
        mask[torch.rand(B, Hq, L, S) > 0.7] = float("-inf")
        mask[:, 0, 3] = float("-inf")
    kwargs = dict(attn_mask=mask, is_causal=causal, enable_gqa=Hq != Hkv)
    return q, k, v, kwargs


def _tol(dtype):
    # float64: the kernels and the oracles differ only by summation order (~1e-15 relative);
    # float32: by float32 rounding over sums of at most a few dozen terms.
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)


def _sdpa(backend, **kwargs):
    return lambda q, k, v: theria.sdpa(q, k, v, backend=backend, block_size=4, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_vjp_jvp_match_torch_and_reference(case, dtype):
    q, k, v, kw = _inputs(case, dtype)
    tri, ref, tor = _sdpa("triton", **kw), _sdpa("reference", **kw), _sdpa("torch", **kw)
    tol = _tol(dtype)
    prim = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    out = tri(*prim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref(*prim), **tol)
    torch.testing.assert_close(out, tor(*prim), **tol)

    do = torch.randn_like(out)
    g_tri = torch.autograd.grad(out, prim, do)
    g_ref = torch.autograd.grad(ref(*prim), prim, do)
    g_tor = torch.autograd.grad(tor(*prim), prim, do)
    for a, b, c in zip(g_tri, g_ref, g_tor, strict=True):
        assert a.shape == b.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(a, c, **tol)

    tangents = tuple(torch.randn_like(x) for x in prim)
    detached = tuple(x.detach() for x in prim)
    o_tri, t_tri = torch.func.jvp(tri, detached, tangents)
    _, t_ref = torch.func.jvp(ref, detached, tangents)
    torch.testing.assert_close(t_tri, t_ref, **tol)
    # the fused forward + JVP pass gives the same pair
    o_f, t_f = triton_impl.sdpa_jvp(*detached, *tangents, scale=None, **kw)
    torch.testing.assert_close(o_f, o_tri, **tol)
    torch.testing.assert_close(t_f, t_ref, **tol)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 16)], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[-1]], ids=lambda c: c[0])
def test_causal_block_split_with_unequal_tiles(case, tiles, monkeypatch):
    """The kernels skip the causal mask on key blocks every query of a program sees whole and
    apply it on those that straddle the diagonal; with BLOCK_M != BLOCK_N (as the GPU tiles
    are) that boundary falls inside a tile, and L, S of these cases are not tile multiples."""
    monkeypatch.setattr(triton_impl, "INTERPRET_TILES", tiles)
    q, k, v, kw = _inputs(case, torch.float64)
    k = torch.cat([k, torch.randn_like(k)], dim=-2)  # S beyond 2 tiles: several full blocks
    v = torch.cat([v, torch.randn_like(v)], dim=-2)
    q = torch.cat([q, torch.randn_like(q), torch.randn_like(q)], dim=-2)
    tri, ref = _sdpa("triton", **kw), _sdpa("reference", **kw)
    prim = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())
    out = tri(*prim)
    tol = _tol(torch.float64)
    torch.testing.assert_close(out, ref(*prim), **tol)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, prim, do),
                    torch.autograd.grad(ref(*prim), prim, do), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **tol)
    detached = tuple(x.detach() for x in prim)
    tangents = tuple(torch.randn_like(x) for x in detached)
    _, t_ref = torch.func.jvp(ref, detached, tangents)
    _, t_tri = torch.func.jvp(tri, detached, tangents)  # forward, then the JVP pass
    torch.testing.assert_close(t_tri, t_ref, **tol)
    _, t_f = triton_impl.sdpa_jvp(*detached, *tangents, scale=None, **kw)  # fused
    torch.testing.assert_close(t_f, t_ref, **tol)


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
def test_untracked_calls_skip_the_function_but_keep_forward_tangents(case):
    """A call that records nothing (no_grad, or no input requiring grad) runs the kernels
    without the autograd Function; forward AD ignores grad mode, so under a dual level (even
    inside no_grad) the Function, and its jvp, must still run."""
    from torch.autograd import forward_ad as fwad

    q, k, v, kw = _inputs(case, torch.float64)
    want = _sdpa("reference", **kw)(q, k, v)
    with torch.no_grad():
        out = _sdpa("triton", **kw)(q, k, v)
    torch.testing.assert_close(out, want, **_tol(torch.float64))
    assert out.grad_fn is None and not out.requires_grad
    tangents = [torch.randn_like(x) for x in (q, k, v)]

    def tangent(backend):
        with torch.no_grad(), fwad.dual_level():
            duals = [fwad.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
            return fwad.unpack_dual(_sdpa(backend, **kw)(*duals)).tangent

    got, ref = tangent("triton"), tangent("reference")
    assert got is not None, "the output's tangent was dropped"
    torch.testing.assert_close(got, ref, **_tol(torch.float64))


def test_partial_tangents_and_cotangent_broadcast():
    """Tangents given for some inputs only (the kernels skip the others' matmuls), and a
    query batch that broadcasts against the keys' (its gradient is reduced)."""
    q = torch.randn(1, 6, 5, dtype=torch.float64)  # (1, L, E) broadcast against B = 3
    k = torch.randn(3, 9, 5, dtype=torch.float64)
    v = torch.randn(3, 9, 4, dtype=torch.float64)
    tri, ref = _sdpa("triton"), _sdpa("reference")
    for which in range(3):
        t = [torch.zeros_like(x) for x in (q, k, v)]
        t[which] = torch.randn_like(t[which])
        _, a = torch.func.jvp(lambda x, w=which: tri(*[x if i == w else y for i, y in
                                                       enumerate((q, k, v))]),
                              ((q, k, v)[which],), (t[which],))  # fmt: skip
        _, b = torch.func.jvp(ref, (q, k, v), tuple(t))
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
        _, d = triton_impl.sdpa_jvp(q, k, v, *[x if i == which else None
                                               for i, x in enumerate(t)])  # fmt: skip
        torch.testing.assert_close(d, b, atol=1e-10, rtol=1e-10)
    g = torch.func.vjp(tri, q, k, v)[1](torch.ones(3, 6, 4, dtype=torch.float64))
    h = torch.func.vjp(ref, q, k, v)[1](torch.ones(3, 6, 4, dtype=torch.float64))
    assert g[0].shape == q.shape
    for a, b in zip(g, h, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_gradcheck_forward_and_reverse():
    """Finite differences in float64 (reverse mode and forward mode), with a key-padding mask
    and causal masking on odd tiny shapes."""
    q = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True])
    fn = _sdpa("triton", attn_mask=mask)
    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradcheck(_sdpa("triton", is_causal=True), (q, k, v), fast_mode=True)


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = (torch.randn(1, 1, 4, 3, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[1] = False  # query 1 attends nothing
    out = theria.sdpa(q, k, v, attn_mask=mask, backend="triton")
    assert torch.equal(out[0, 0, 1], torch.zeros(3, dtype=torch.float64))
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(gq[0, 0, 1], torch.zeros(3, dtype=torch.float64))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    problem = theria.attention.contract.Problem(scale=0.5, is_causal=False)
    _, lse = triton_impl.forward(q.detach(), k.detach(), v.detach(), mask, problem)
    assert torch.isneginf(lse[0, 0, 1]) and torch.isfinite(lse[0, 0, [0, 2, 3]]).all()


def test_second_order_is_exact_through_the_fallback():
    """Double backward and forward-over-reverse go through `backward_jvp`: a Triton kernel
    when `kernels.second_order` provides one, else the announced torch fallback. Either way,
    exact."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    u = tuple(torch.randn_like(x) for x in (q, k, v))

    def hvp(backend):
        out = theria.sdpa(q, k, v, is_causal=True, backend=backend)
        g = torch.autograd.grad((out**2).sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(g, (q, k, v), u)

    if triton_impl._second_order() is None:
        with pytest.warns(RuntimeWarning, match="second-order"):
            _warnings.forget("triton:second-order-fallback")
            got = hvp("triton")
    else:
        got = hvp("triton")
    for a, b in zip(got, hvp("reference"), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_bad_inputs_raise_clearly():
    q = torch.randn(1, 3, 4).to(torch.int32)
    with pytest.raises(TypeError, match="floating-point"):
        theria.sdpa(q, q, q, backend="triton")
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="dropout"):
        theria.sdpa(x, x, x, dropout_p=0.5, backend="triton")


def test_head_dim_above_limit_falls_back_visibly():
    x = torch.randn(1, 3, triton_impl.MAX_HEAD_DIM + 1, dtype=torch.float64)
    _warnings.forget("triton:unsupported")
    with pytest.warns(RuntimeWarning, match="no Triton kernel"):
        out = theria.sdpa(x, x, x, backend="triton")
    torch.testing.assert_close(out, theria.sdpa(x, x, x, backend="reference"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mask_kind, causal",
    [(None, False), (None, True), ("padding", False), ("dense", False), ("float", False)],
)
def test_larger_odd_shapes(mask_kind, causal):
    """Several tiles per row and column (tiles are 16 in the interpreter), head dims 40 and 72,
    GQA. (attn_mask and is_causal are exclusive in torch's sdpa contract.)"""
    case = ("big", 2, 2, 1, 67, 45, 40, 72, mask_kind, causal)
    test_forward_vjp_jvp_match_torch_and_reference(case, torch.float64)


def test_torch_func_compositions():
    """torch.func sees through the kernels: jvp, grad, forward-over-reverse, and
    reverse-over-forward (which must fall back to traceable ops, not lose its graph)."""
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64) for _ in "qkv")
    tq = torch.randn_like(q)

    def all_modes(backend):
        f = _sdpa(backend, is_causal=True)
        loss = lambda q: (f(q, k, v) ** 2).sum()  # noqa: E731
        return (
            torch.func.jvp(lambda q: f(q, k, v), (q,), (tq,))[1],
            torch.func.grad(loss)(q),
            torch.func.jvp(torch.func.grad(loss), (q,), (tq,))[1],
            torch.func.grad(lambda q: torch.func.jvp(lambda q: f(q, k, v), (q,), (tq,))[1].sum())(
                q
            ),
        )

    for a, b in zip(all_modes("triton"), all_modes("reference"), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_dot_precision_per_dtype_and_head_width():
    """float32: the narrow scheme (tf32x3) up to 64-wide heads, the wide one above (bf16x6 on
    CUDA, tests/attention/test_kernel_precision.py; numpy dots here); float64 IEEE; 16-bit
    inputs ignore the option. The first- and second-order kernels share the rule, and the
    padded width decides it."""
    from theria.attention import kernels
    from theria.attention.kernels import second_order

    narrow, wide = kernels._FP32_DOTS
    p = triton_impl.precision
    assert p(torch.float32, 16) == p(torch.float32, 64) == narrow == "tf32x3"
    assert p(torch.float32, 128) == wide
    assert p(torch.float64, 16) == "ieee"
    assert p(torch.bfloat16, 128) == p(torch.float16, 64) == "tf32"
    assert second_order._precision(torch.float32, 128) == wide
    consts = triton_impl._consts_cached(72, 40, torch.float32, 0, False)
    assert consts["PREC"] == wide  # the padded width (128) decides, not E
    assert triton_impl._consts_cached(40, 64, torch.float32, 0, False)["PREC"] == "tf32x3"


# (name, B, Hq, Hkv, L, S, E, Ev, mask kind, causal): head dims whose rows are 16-byte aligned
# in float32 and float64, so that every streamed operand may be read by tensor descriptor
TMA_CASES = [
    ("plain", 1, 2, 2, 21, 37, 8, 12, None, False),
    ("causal-L>S", 2, 2, 2, 29, 19, 16, 8, None, True),
    ("gqa-padding", 1, 4, 2, 10, 23, 8, 8, "padding", False),
]


@pytest.mark.parametrize("tiles", [(16, 16), (32, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", TMA_CASES, ids=[c[0] for c in TMA_CASES])
def test_descriptor_loads_match_reference(case, dtype, tiles, monkeypatch):
    """The TMA path (K, V by tensor descriptor in the forward and dQ pass, Q, dO in the dK/dV
    pass; zero-filled past the edges, which the tails of these shapes reach) gives the
    reference's values; it runs on Hopper GPUs for 16-bit inputs, here forced in the
    interpreter. Every kernel of the call is checked to have taken it."""
    monkeypatch.setattr(triton_impl, "FORCE_TMA", True)
    monkeypatch.setattr(triton_impl, "INTERPRET_TILES", tiles)
    taken = []
    launch = triton_impl._launch

    def spy(tuned, plain, grid_rows, zb, args, consts):
        taken.append((plain.fn.__name__, consts.get("TMA")))
        return launch(tuned, plain, grid_rows, zb, args, consts)

    monkeypatch.setattr(triton_impl, "_launch", spy)
    q, k, v, kw = _inputs(case, dtype)
    # each input a view into storage with NaN rows and columns past its edges: a tile read
    # there must be zero-filled (a 0 weight times NaN would still poison the result)
    prim = tuple(_nan_padded(x).requires_grad_() for x in (q, k, v))
    tri, ref = _sdpa("triton", **kw), _sdpa("reference", **kw)
    out = tri(*prim)
    tol = _tol(dtype)
    torch.testing.assert_close(out, ref(*prim), **tol)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, prim, do),
                    torch.autograd.grad(ref(*prim), prim, do), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **tol)
    assert sorted(set(taken)) == [("_attn_bwd_dkdv", True), ("_attn_bwd_dq", True),
                                  ("_attn_fwd", True)]  # fmt: skip


def _nan_padded(x: torch.Tensor) -> torch.Tensor:
    """x as a leaf view into storage with 3 more rows and 4 more columns of NaN (its rows stay
    16-byte aligned for the head dims of TMA_CASES)."""
    *batch, n, e = x.shape
    big = torch.full((*batch, n + 3, e + 4), float("nan"), dtype=x.dtype)
    big[..., :n, :e] = x
    return big[..., :n, :e]


def test_descriptor_loads_need_aligned_rows(monkeypatch):
    """A head dim whose rows are not 16-byte aligned (float32, E = 6: 24 bytes), or a column
    stride other than 1, keeps pointer loads for that operand."""
    monkeypatch.setattr(triton_impl, "FORCE_TMA", True)
    x = torch.randn(2, 3, 8, dtype=torch.float32)
    lay = triton_impl._Batch((2,), [x])
    assert triton_impl._tma(x, x, lay, x)
    odd = torch.randn(2, 3, 6, dtype=torch.float32)
    assert not triton_impl._tma(odd, odd, triton_impl._Batch((2,), [odd]), odd)
    cols = torch.randn(2, 8, 3, dtype=torch.float32).transpose(-1, -2)  # column stride 3
    assert not triton_impl._tma(cols, cols, triton_impl._Batch((2,), [cols]), cols)
    monkeypatch.setattr(triton_impl, "FORCE_TMA", False)
    assert not triton_impl._tma(x, x, lay, x)  # interpreter: pointer loads unless forced


def test_descriptor_loads_where_they_were_measured_faster(monkeypatch):
    """On a GPU with TMA the descriptor path is taken for 16-bit inputs with heads padded to 128
    and sequences of 4096 or more (triton_impl.TMA_MIN_HEAD, TMA_MIN_N: where the H200 runs
    measured it faster); float32, 64-wide heads and shorter sequences keep pointer loads."""
    monkeypatch.setattr(triton_impl, "INTERPRET", False)
    monkeypatch.setattr(triton_impl, "_tma_device", lambda device: True)

    def takes(n, e, dtype=torch.bfloat16):
        x = torch.zeros(2, n, e, dtype=dtype)
        return triton_impl._tma(x, x, triton_impl._Batch((2,), [x]), x)

    assert takes(4096, 128) and takes(4096, 96) and takes(8192, 128, torch.float16)
    assert not takes(2048, 128) and not takes(4096, 64) and not takes(4096, 128, torch.float32)
