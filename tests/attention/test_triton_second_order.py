"""The Triton second-order kernels (`kernels.second_order.backward_jvp`) on the CPU through
Triton's interpreter: against the `torch` backend's spec (`blockwise.backward_jvp`) directly, and
end to end through `theria.sdpa(backend="triton")` against the `reference` backend (double
backward, forward-over-reverse, gradgradcheck, third order) in float64, plus float32."""

from __future__ import annotations

import functools
import importlib
import os

import pytest
import torch
from torch.func import grad, jvp

import theria
from tests.attention.cases import CASES, Case
from theria.attention import blockwise
from theria.attention.contract import Canonical, canonicalize

pytestmark = pytest.mark.triton_interpret


@pytest.fixture(scope="module")
def so():
    """`kernels.second_order`, run through Triton's interpreter. TRITON_INTERPRET=1 must be set
    before Triton is first imported (tests/conftest.py does it where no GPU is visible)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported")
    from theria.attention.kernels import second_order

    if not second_order.INTERPRET:
        pytest.fail("kernels.second_order was built before TRITON_INTERPRET=1 was set")
    return second_order


def _canonical(case: Case, dtype: torch.dtype, block: int = 3) -> Canonical:
    q, k, v, kw = case.build(dtype)
    return canonicalize(
        q,
        k,
        v,
        kw.get("attn_mask"),
        0.0,
        kw.get("is_causal", False),
        kw.get("scale"),
        kw.get("enable_gqa", False),
        block,
    )


# Which tangents are given: the double-backward VJP passes no dȮ; forward-over-reverse all four.
TANGENTS = {
    "all": "qkvd",
    "double_backward": "qkv",
    "q": "q",
    "k_dO": "kd",
    "v": "v",
}


def _run(so, c: Canonical, which: str):
    out, lse = blockwise.forward(c.q, c.k, c.v, c.mask, c.problem)
    do = torch.randn_like(out)
    t = {
        "q": torch.randn_like(c.q),
        "k": torch.randn_like(c.k),
        "v": torch.randn_like(c.v),
        "d": torch.randn_like(out),
    }
    tq, tk, tv, tdo = (t[x] if x in which else None for x in "qkvd")
    args = (c.q, c.k, c.v, c.mask, c.problem, out, lse, do, tq, tk, tv, tdo)
    return so.backward_jvp(*args), args


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("tangents", ["all", "double_backward"])
def test_matches_blockwise_float64(so, case: Case, tangents: str) -> None:
    c = _canonical(case, torch.float64)
    got, args = _run(so, c, TANGENTS[tangents])
    want = blockwise.backward_jvp(*args)
    for name, g, w, like in zip(
        ("dq_dot", "dk_dot", "dv_dot", "o_dot"), got, want, (*args[:3], args[5]), strict=True
    ):
        assert g.shape == like.shape, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=str)
def test_query_major_dkdv_tiles(so, case: Case, monkeypatch) -> None:
    """The dK̇/dV̇ kernel's other tile orientation (query-major, transposed before the dots)."""
    monkeypatch.setattr(so, "INTERPRET_CONFIG", (32, 16, 1, 1, False))
    c = _canonical(case, torch.float64)
    got, args = _run(so, c, "qkvd")
    for g, w in zip(got, blockwise.backward_jvp(*args), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tangents", ["q", "k_dO", "v"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[6]], ids=str)
def test_partial_tangents_float64(so, case: Case, tangents: str) -> None:
    """Tangents given as None are zero (and their matmuls skipped)."""
    c = _canonical(case, torch.float64)
    got, args = _run(so, c, TANGENTS[tangents])
    for g, w in zip(got, blockwise.backward_jvp(*args), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tangents", ["all", "v", "q"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[9]], ids=str)
def test_given_tangent_stats(so, case: Case, tangents: str) -> None:
    """With Ȯ and μ given (forward-over-reverse has them), pass 1 is row sums only."""
    c = _canonical(case, torch.float64)
    got, args = _run(so, c, TANGENTS[tangents])
    q, k, v, mask, problem, out, lse, _do, tq, tk, tv, _tdo = args
    o_dot, mu = blockwise.forward_jvp(q, k, v, mask, problem, out, lse, tq, tk, tv)
    again = so.backward_jvp(*args, o_dot=o_dot, mu=mu)
    for g, a in zip(got, again, strict=True):
        torch.testing.assert_close(a, g, rtol=1e-10, atol=1e-12)


def test_no_tangent_is_zero(so) -> None:
    c = _canonical(CASES[0], torch.float64)
    got, _ = _run(so, c, "")
    assert all(bool((g == 0).all()) for g in got)


def test_dead_rows_give_zeros(so) -> None:
    """A fully masked row: zero Ȯ and no contribution anywhere (never NaN)."""
    c = _canonical(CASES[3], torch.float64)  # bool mask, row 1 masked out entirely
    (dq, dk, dv, o_dot), _ = _run(so, c, "qkvd")
    assert (o_dot[..., 1, :] == 0).all() and (dq[..., 1, :] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()


def _odd_problem(dtype: torch.dtype, causal: bool):
    """Odd sizes, head dims that are not powers of two, several tiles in each direction."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, 40, generator=g, dtype=torch.float64)
    k = torch.randn(1, 45, 40, generator=g, dtype=torch.float64)  # broadcast over the batch
    v = torch.randn(1, 45, 24, generator=g, dtype=torch.float64)
    mask = None if causal else torch.rand(37, 45, generator=g) > 0.2
    c64 = canonicalize(q, k, v, mask, 0.0, causal, None, False, 16)
    return c64, canonicalize(
        q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.0, causal, None, False, 16
    )


@pytest.mark.parametrize("units", ["natural", "log2"])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_two_times_rule(so, causal: bool, units: str, monkeypatch) -> None:
    """float32 kernel error against float64 at most 2× (+ a float32 ulp-level floor) the error of
    the same computation in float32 torch ops (flash-attention's rule). "log2": the kernels as
    16-bit inputs compile them (scores scaled by log2(e), P = exp2(·); `kernels.natural_exp`),
    which the interpreter cannot run in 16 bits, here in float32."""
    if units == "log2":
        monkeypatch.setattr(so, "natural_exp", lambda dtype: False)
    c64, c32 = _odd_problem(torch.float32, causal)
    gen = torch.Generator().manual_seed(2)
    out64, lse64 = blockwise.forward(c64.q, c64.k, c64.v, c64.mask, c64.problem)
    do, tq, tk, tv, tdo = (
        torch.randn(x.shape, generator=gen, dtype=torch.float64)
        for x in (out64, c64.q, c64.k, c64.v, out64)
    )
    want = blockwise.backward_jvp(
        c64.q, c64.k, c64.v, c64.mask, c64.problem, out64, lse64, do, tq, tk, tv, tdo
    )
    f32 = [x.float() for x in (out64, lse64, do, tq, tk, tv, tdo)]
    out, lse, do32, tq32, tk32, tv32, tdo32 = f32
    args = (c32.q, c32.k, c32.v, c32.mask, c32.problem, out, lse, do32, tq32, tk32, tv32, tdo32)
    got = so.backward_jvp(*args)
    peer = blockwise.backward_jvp(*args)
    for name, g, p, w in zip(("dq_dot", "dk_dot", "dv_dot", "o_dot"), got, peer, want, strict=True):
        err = (g.double() - w).abs().max().item()
        err_peer = (p.double() - w).abs().max().item()
        # 2× the peer's error, plus 1e-5 · max|w| (a few float32 ulps of the result's scale)
        # so that a peer that happens to be exact does not demand an exact kernel.
        bound = 2 * err_peer + 1e-5 * w.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (peer {err_peer:.3e})"


# (L, S, causal, mask): sizes that fill the interpreter's (16, 32) tiles exactly and sizes that
# do not, L < S and L > S, causal and not; masks (whose loads keep their bounds) on some shapes;
# "low": a float mask that puts one row's lse near −1000, where exp(−lse) overflows even in
# float64, so a key past S left unmasked turns into NaN (the reason for BOUND_N).
_BLOCK_CASES = [
    *((L, S, causal, None) for L, S in ((64, 64), (48, 96), (96, 32), (40, 64), (64, 40))
      for causal in (False, True)),
    (64, 64, False, "bool"), (40, 64, False, "float"), (64, 40, False, "bool"),
    (40, 40, False, "low"),
]  # fmt: skip


# "low": the dK̇/dV̇ pass leaves keys past S unmasked (their output rows are never stored), and
# there exp(−lse) overflows to inf and then NaN; numpy (the interpreter) warns, a GPU does not.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize(("L", "S", "causal", "mask"), _BLOCK_CASES, ids=str)
def test_whole_and_partial_blocks(so, L: int, S: int, causal: bool, mask, monkeypatch) -> None:
    """The kernels compile the bounds mask only where the last row / key block is partial
    (BOUND_M, BOUND_N) and the causal mask only on blocks that cross the diagonal: each case in
    both dK̇/dV̇ orientations (key-major (16, 32) tiles and query-major (32, 16) ones)."""
    g = torch.Generator().manual_seed(L * 1000 + S)
    q = torch.randn(2, L, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, S, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, S, 8, generator=g, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(L, S, generator=g) > 0.3
    elif mask == "float":
        m = torch.randn(L, S, generator=g, dtype=torch.float64)
    elif mask == "low":
        m = torch.zeros(L, S, dtype=torch.float64)
        m[5] = -1000.0
    for cfg in ((16, 32, 1, 1, True), (32, 16, 1, 1, False)):
        monkeypatch.setattr(so, "INTERPRET_CONFIG", cfg)
        c = canonicalize(q, k, v, m, 0.0, causal, None, False, 16)
        for which in ("qkvd", "qkv"):
            got, args = _run(so, c, which)
            for g_, w in zip(got, blockwise.backward_jvp(*args), strict=True):
                torch.testing.assert_close(g_, w, rtol=1e-10, atol=1e-12)


def test_bad_tangent_shape(so) -> None:
    c = _canonical(CASES[0], torch.float64)
    out, lse = blockwise.forward(c.q, c.k, c.v, c.mask, c.problem)
    with pytest.raises(ValueError, match="tk has shape"):
        so.backward_jvp(c.q, c.k, c.v, None, c.problem, out, lse, out, None, c.q, None, None)


# ------------------------------------------------------------------ end to end via theria.sdpa


@pytest.fixture(autouse=True)
def _dual_route(monkeypatch):
    """theria.autodiff's fwd_rev takes dual tensors here, whatever an earlier test in this
    process met (an op without a forward formula switches it to torch.func for good)."""
    from theria import autodiff

    monkeypatch.setitem(autodiff._DUAL_ROUTE, "usable", True)


@pytest.fixture(scope="module")
def triton_impl(so):
    try:
        mod = importlib.import_module("theria.attention.triton_impl")
    except ImportError as e:
        pytest.fail(f"theria.attention.triton_impl is not importable: {e}")
    assert mod._second_order() is so.backward_jvp, "triton_impl does not call these kernels"
    return mod


def _loss(backend: str, kw: dict):
    f = functools.partial(theria.sdpa, backend=backend, **kw)

    def loss(q, k, v):
        out = f(q, k, v)
        return (out.sin() * out).sum() + 0.3 * (out**2).sum()  # a non-trivial dO(out)

    return loss


def _inputs(case: Case, dtype=torch.float64):
    q, k, v, kw = case.build(dtype)
    return tuple(t.requires_grad_(True) for t in (q, k, v)), kw


def _double_backward(loss, args, u):
    g = torch.autograd.grad(loss(*args), args, create_graph=True)
    dot = sum((gi * ui).sum() for gi, ui in zip(g, u, strict=True))
    return torch.autograd.grad(dot, args)


def _fwd_rev(loss, args, u):
    return jvp(grad(loss, argnums=(0, 1, 2)), tuple(a.detach() for a in args), u)[1]


def _fwd_rev_dual(loss, args, u):
    from theria import autodiff

    return autodiff.hvp(loss, args, u, "fwd_rev")  # dual tensors outside torch.func


@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev", "fwd_rev_dual"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_sdpa_hvp_matches_reference(triton_impl, case: Case, mode: str) -> None:
    args, kw = _inputs(case)
    u = tuple(torch.randn_like(a) for a in args)
    hvp = {"rev_rev": _double_backward, "fwd_rev": _fwd_rev, "fwd_rev_dual": _fwd_rev_dual}[mode]
    got = hvp(_loss("triton", kw), args, u)
    want = hvp(_loss("reference", kw), args, u)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=str)
def test_forward_ad_over_a_plain_backward(triton_impl, case: Case) -> None:
    """Forward-over-reverse through torch.autograd.forward_ad with a backward that records no
    graph (no create_graph): grad mode is off there, yet the gradients' tangents must come
    through. The kernels propagate no tangent themselves, so the backward may skip its autograd
    Function (and its jvp) only where no dual level is open. Against the reference backend."""
    from torch.autograd import forward_ad as fwad

    (q, k, v), kw = _inputs(case)
    tangents = [torch.randn_like(x) for x in (q, k, v)]
    do = torch.randn_like(theria.sdpa(q, k, v, backend="reference", **kw))

    def grads_and_tangents(backend: str) -> list:
        with fwad.dual_level():
            duals = [fwad.make_dual(x, t) for x, t in zip((q, k, v), tangents, strict=True)]
            out = theria.sdpa(*duals, backend=backend, **kw)
            return [fwad.unpack_dual(g) for g in torch.autograd.grad(out, duals, do)]

    for got, want in zip(grads_and_tangents("triton"), grads_and_tangents("reference"),
                         strict=True):  # fmt: skip
        assert got.tangent is not None, "the gradient's tangent was dropped"
        torch.testing.assert_close(got.primal, want.primal, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got.tangent, want.tangent, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[9]], ids=str)
def test_autodiff_fwd_rev_runs_the_kernels_for_the_forward_jvp(
    triton_impl, case: Case, monkeypatch
) -> None:
    """theria.autodiff.hvp(mode="fwd_rev") outside torch.func takes dual tensors: grad mode is
    on and the primals require grad while the forward's JVP runs, yet no reverse pass
    differentiates that tangent, so the JVP step must stay on the kernels (not the blockwise
    ops a reverse-over-forward graph needs). Against the reference backend in float64."""
    from theria import autodiff

    args, kw = _inputs(case)
    u = tuple(torch.randn_like(a) for a in args)
    want = autodiff.hvp(_loss("reference", kw), args, u, "rev_rev")
    took = []
    monkeypatch.setattr(blockwise, "forward_jvp", lambda *a, **k: took.append(1) or None)
    got = autodiff.hvp(_loss("triton", kw), args, u, "fwd_rev")
    assert not took, "the forward JVP under forward-over-reverse ran the blockwise ops"
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("route", ["autodiff", "torch.func", "forward_ad"])
def test_fwd_rev_through_an_inner_create_graph_gradient(triton_impl, route: str) -> None:
    """The HVP of a MAML-like objective (an inner gradient step taken with create_graph=True):
    forward-over-reverse runs the double backward's Function on dual tensors, which must carry
    their tangents through it (the kernels would drop them silently: 0.33 relative error before
    `function._carries_tangent`). Against the reference backend's reverse-over-reverse."""
    from torch.autograd import forward_ad as fwad

    from theria import autodiff

    (q, k, v), kw = _inputs(CASES[1])

    def objective(backend: str):
        def f(q, k, v):
            inner = (theria.sdpa(q, k, v, backend=backend, **kw) ** 2).sum()
            gq, gk, gv = torch.autograd.grad(inner, (q, k, v), create_graph=True)
            out = theria.sdpa(q - 0.1 * gq, k - 0.1 * gk, v - 0.1 * gv, backend=backend, **kw)
            return out.sin().sum()

        return f

    u = tuple(torch.randn_like(x) for x in (q, k, v))
    want = autodiff.hvp(objective("reference"), (q, k, v), u, "rev_rev")
    f = objective("triton")
    if route == "autodiff":
        got = autodiff.hvp(f, (q, k, v), u, "fwd_rev")
    elif route == "torch.func":
        got = jvp(grad(f, argnums=(0, 1, 2)), (q.detach(), k.detach(), v.detach()), u)[1]
    else:
        leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
        with fwad.dual_level():
            duals = [fwad.make_dual(x, t) for x, t in zip(leaves, u, strict=True)]
            gs = torch.autograd.grad(f(*duals), leaves)
            got = [fwad.unpack_dual(g).tangent for g in gs]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_reverse_over_forward_still_records_the_tangent(triton_impl) -> None:
    """Outside theria's forward-over-reverse driver a JVP taken under grad mode keeps a graph
    through the tangent: a backward through it (reverse-over-forward) matches the reference's
    gradient of ‖J u‖², which takes J u by reverse mode alone (the VJP of a VJP: torch 2.14's
    forward-mode softmax cannot be differentiated in reverse, an in-place exp in its formula)."""
    from torch.autograd import forward_ad as fwad

    args, kw = _inputs(CASES[1])
    tangents = [torch.randn_like(x) for x in args]
    with fwad.dual_level():
        duals = [fwad.make_dual(x, t) for x, t in zip(args, tangents, strict=True)]
        t_out = fwad.unpack_dual(theria.sdpa(*duals, backend="triton", **kw)).tangent
        got = torch.autograd.grad((t_out**2).sum(), args)
    out = theria.sdpa(*args, backend="reference", **kw)
    w = torch.zeros_like(out, requires_grad=True)
    vjp = torch.autograd.grad(out, args, w, create_graph=True)  # linear in w
    ju = torch.autograd.grad(vjp, w, tangents, create_graph=True)[0]  # J u
    want = torch.autograd.grad((ju**2).sum(), args)
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g, w_, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", [CASES[2], CASES[9]], ids=str)
def test_gradgradcheck(triton_impl, case: Case) -> None:
    args, kw = _inputs(case)
    fn = functools.partial(theria.sdpa, backend="triton", **kw)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=str)
def test_gradgradcheck_full(triton_impl, case: Case) -> None:
    args, kw = _inputs(case)
    fn = functools.partial(theria.sdpa, backend="triton", **kw)
    assert torch.autograd.gradgradcheck(fn, args, check_fwd_over_rev=True)


def test_third_order_through_torch_backend(triton_impl) -> None:
    """Past second order the triton backend hands over to the blockwise torch formulas."""
    args, kw = _inputs(CASES[1])
    u = tuple(torch.randn_like(a) for a in args)
    w = tuple(torch.randn_like(a) for a in args)

    def third(backend):
        loss = _loss(backend, kw)
        g = torch.autograd.grad(loss(*args), args, create_graph=True)
        hu = torch.autograd.grad(
            sum((gi * ui).sum() for gi, ui in zip(g, u, strict=True)), args, create_graph=True
        )
        hw = sum((hi * wi).sum() for hi, wi in zip(hu, w, strict=True))
        return torch.autograd.grad(hw, args)

    for g, r in zip(third("triton"), third("reference"), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_hvp_larger(triton_impl, causal: bool) -> None:
    """Sizes over several tiles (L = 97, S = 70, E = 72, Ev = 40) end to end, both HVP modes:
    float64 against `reference`, float32 by the 2× rule against float64."""
    torch.manual_seed(3)
    shapes = ((1, 2, 97, 72), (1, 2, 70, 72), (1, 2, 70, 40))
    x64 = tuple(torch.randn(s, dtype=torch.float64) for s in shapes)
    u64 = tuple(torch.randn_like(a) for a in x64)
    kw = {"is_causal": causal}
    for hvp in (_double_backward, _fwd_rev):

        def run(backend, dtype, hvp=hvp):
            args = tuple(a.to(dtype).requires_grad_(True) for a in x64)
            return hvp(_loss(backend, kw), args, tuple(t.to(dtype) for t in u64))

        want = run("reference", torch.float64)
        for g, w in zip(run("triton", torch.float64), want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        for g, p, w in zip(
            run("triton", torch.float32), run("reference", torch.float32), want, strict=True
        ):
            err, err_peer = (g.double() - w).abs().max(), (p.double() - w).abs().max()
            # 2× the float32 reference's error plus a float32-ulp floor at the result's scale.
            assert err <= 2 * err_peer + 1e-5 * w.abs().max()


def test_tile_shrinks_when_shared_memory_overflows(so, monkeypatch) -> None:
    """A configuration that does not fit is shrunk at launch, announced once, and remembered."""
    from triton.runtime.errors import OutOfResources

    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, BLOCK_M, BLOCK_N, num_warps, num_stages, BOUND_N, **kw):
                if BLOCK_M * BLOCK_N * num_stages > 32 * 32 * 2:
                    raise OutOfResources(1 << 18, 1 << 17, "shared memory")
                launched.append((grid, BLOCK_M, BLOCK_N, num_stages, BOUND_N))

            return run

    monkeypatch.setattr(so, "INTERPRET", False)
    monkeypatch.setitem(so.CONFIGS, "dq", {64: (128, 64, 8, 3, False)})
    monkeypatch.setattr(so, "CONFIGS_FLOAT32", {})
    monkeypatch.setattr(so, "_fitted", {})
    with pytest.warns(RuntimeWarning, match="does not fit in shared memory.*CONFIGS_FLOAT32"):
        so._launch(FakeKernel(), "dq", 32, 4, 100, 48, 3, [], {})  # float32, E=32: key 64
    # (128, 64, 3) -> stages 2 -> BLOCK_M 64 -> 32 -> BLOCK_N 32: the first that fits; the key
    # bound follows the tile that ran (48 keys: the last block of 32 is partial)
    assert launched == [((3 * 4,), 32, 32, 2, True)]
    assert so._fitted[("dq", 64, 4, False)] == (32, 32, 8, 2, False)
    # remembered for float32 only: bfloat16 with the same row bytes (E=64) keeps its table entry
    assert so._config("dq", 32, 4) == (64, (32, 32, 8, 2, False))
    assert so._config("dq", 64, 2) == (64, (128, 64, 8, 3, False))
    assert so._shrink((16, 16, 4, 1, False)) is None


def test_float32_configurations_override_the_table(so, monkeypatch) -> None:
    monkeypatch.setattr(so, "INTERPRET", False)
    monkeypatch.setattr(so, "_fitted", {})
    key, cfg = so._config("dq", 64, 4)  # float32, head dim 64: 128 bytes/2 per row
    assert (key, cfg) == (128, so.CONFIGS_FLOAT32["dq"][128])
    assert so._config("dq", 128, 2) == (128, so.CONFIGS["dq"][128])  # bf16, same row bytes
    assert so._config("rowstats", 32, 4) == (64, so.CONFIGS["rowstats"][64])  # no fp32 entry
    assert so._config("dkdv", 64, 4) == (128, so.CONFIGS_FLOAT32["dkdv"][128])
    assert so._config("dkdv", 128, 2) == (128, so.CONFIGS["dkdv"][128])
    # over the dO-tangent table too
    assert so._config("dq", 64, 4, tdo=True) == (128, so.CONFIGS_FLOAT32["dq"][128])


def test_dO_tangent_configurations_override_the_table(so, monkeypatch) -> None:
    """Calls with a dO tangent (fwd_rev) take CONFIGS_TDO where it has an entry; a shrink is
    remembered per form."""
    monkeypatch.setattr(so, "INTERPRET", False)
    monkeypatch.setitem(so.CONFIGS, "dq", {64: (128, 64, 8, 3, False), 128: (64, 32, 4, 2, False)})
    monkeypatch.setattr(so, "CONFIGS_TDO", {"dq": {128: (128, 32, 8, 2, False)}})
    monkeypatch.setattr(so, "_fitted", {("dq", 64, 2, True): (64, 64, 8, 2, False)})
    assert so._config("dq", 128, 2, tdo=True) == (128, (128, 32, 8, 2, False))
    assert so._config("dq", 128, 2) == (128, (64, 32, 4, 2, False))
    assert so._config("dq", 64, 2, tdo=True) == (64, (64, 64, 8, 2, False))  # shrunk, this form
    assert so._config("dq", 64, 2) == (64, (128, 64, 8, 3, False))
    so.set_config("dq", 64, (32, 32, 4, 2, False), tdo=True)
    assert so.CONFIGS_TDO["dq"][64] == (32, 32, 4, 2, False)
    assert so.CONFIGS["dq"][64] == (128, 64, 8, 3, False) and not so._fitted


def test_set_config_drops_the_plans_built_with_the_old_tile(so, monkeypatch) -> None:
    """A stored launch plan keeps its tiles: a tile sweep that only edits CONFIGS re-runs the
    first tile's plan for every configuration (the H200 D=128 sweep of 2026-12-02 did)."""
    monkeypatch.setitem(so.CONFIGS, "dq", dict(so.CONFIGS["dq"]))
    monkeypatch.setattr(so, "_fitted", {("dq", 64, 2, False): (32, 32, 4, 2, False)})
    monkeypatch.setattr(so, "_PLANS", {("hvp", "some layout"): ("a stored plan",)})
    so.set_config("dq", 64, (64, 64, 4, 2, False))
    assert so.CONFIGS["dq"][64] == (64, 64, 4, 2, False)
    assert not so._PLANS and not so._fitted
