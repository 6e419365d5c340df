"""theria.autodiff on functions with a known Hessian, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from theria import autodiff
from theria.bench.common import refs_calls


def _quartic(x, y):
    # f = ½ xᵀAx + (xᵀy)² ; a non-quadratic coupling so fwd/rev/fd all have work to do
    return 0.5 * x @ A @ x + (x @ y) ** 2


A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)


def _dense_hessian(x, y):
    h = torch.autograd.functional.hessian(_quartic, (x, y))
    return torch.cat([torch.cat([h[0][0], h[0][1]], 1), torch.cat([h[1][0], h[1][1]], 1)], 0)


@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev"])
def test_hvp_equals_dense_hessian(mode: str) -> None:
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    u = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    hv = autodiff.hvp(_quartic, (x, y), u, mode)
    expected = _dense_hessian(x, y) @ torch.cat(u)
    torch.testing.assert_close(torch.cat(hv), expected, rtol=1e-12, atol=1e-12)


def test_fd_hvp_and_check_hvp() -> None:
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    errs = autodiff.check_hvp(_quartic, (x, y), eps=1e-5)
    assert errs["rev_vs_fwd"] < 1e-13 and errs["symmetry"] < 1e-13
    # central differences: error O(eps²) from the cubic terms; the quartic has bounded f'''
    assert errs["rev_vs_fd"] < 1e-8, errs


def test_dict_primals_and_jvp() -> None:
    params = {"w": torch.randn(3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    tang = {"w": torch.ones(3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}

    def f(p):
        return _quartic(p["w"], p["b"])

    hv = autodiff.hvp(f, params, tang, "fwd_rev")
    assert set(hv) == {"w", "b"}
    hv_rr = autodiff.hvp(f, params, tang, "rev_rev")
    for key in hv:
        torch.testing.assert_close(hv[key], hv_rr[key])
    _out, dot = autodiff.jvp(f, params, tang)
    g = autodiff.grad(f, params)
    torch.testing.assert_close(dot, (g["w"] * tang["w"]).sum() + (g["b"] * tang["b"]).sum())


def test_bad_arguments() -> None:
    x = torch.randn(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        autodiff.hvp(lambda x: (x**3).sum(), (x,), (torch.ones(4),))
    with pytest.raises(ValueError, match="mode"):
        autodiff.hvp(lambda x: (x**3).sum(), (x,), (x,), mode="fwd_fwd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scalar"):
        autodiff.hvp(lambda x: x**3, (x,), (x,))


def test_dict_tangents_are_matched_by_key_not_position() -> None:
    params = {
        "a": torch.tensor([1.0, 2.0], dtype=torch.float64),
        "b": torch.tensor([3.0], dtype=torch.float64),
    }
    tang = {"b": torch.zeros(1, dtype=torch.float64), "a": torch.ones(2, dtype=torch.float64)}

    def f(p):
        return (p["a"] ** 2).sum() + 0.0 * (p["b"] ** 2).sum()

    for mode in ("rev_rev", "fwd_rev"):
        hv = autodiff.hvp(f, params, tang, mode)
        torch.testing.assert_close(hv["a"], torch.full((2,), 2.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="keys"):
        autodiff.hvp(f, params, {"a": tang["a"], "c": tang["b"]})


def test_grad_with_create_graph_stays_connected() -> None:
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (g,) = autodiff.grad(lambda a: (a**3).sum(), (x,), create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(h, 6 * x.detach())


def test_rev_rev_with_unused_or_linear_parts_gives_zeros_like_fwd_rev() -> None:
    a, b = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    u = (torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    for f in (lambda a, b: (a**2).sum(), lambda a, b: (a + 2 * b).sum()):
        rr = autodiff.hvp(f, (a, b), u, "rev_rev")
        fr = autodiff.hvp(f, (a, b), u, "fwd_rev")
        for x, y in zip(rr, fr, strict=True):
            torch.testing.assert_close(x, y)


def test_rev_rev_takes_tangents_of_another_dtype() -> None:
    """The HVP is a vector-Jacobian product of ∇f with the tangents as cotangents: a float64
    tangent of a float32 primal is rounded to float32 first, as the primal's gradient is."""
    x = torch.randn(4)
    u = torch.randn(4, dtype=torch.float64)
    (hv,) = autodiff.hvp(lambda a: (a**3).sum(), (x,), (u,), "rev_rev")
    assert hv.dtype == torch.float32
    torch.testing.assert_close(hv, 6 * x * u.float())


def test_fwd_rev_takes_dual_tensors_outside_torch_func_and_torch_func_under_vmap(
    monkeypatch,
) -> None:
    """Both forward-over-reverse routes give the Hessian; outside a torch.func transform the
    dual-tensor one runs (less host work), under vmap the torch.func one (dual tensors and
    torch.autograd.grad do not compose with vmap)."""
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    u = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    expected = _dense_hessian(x, y) @ torch.cat(u)
    monkeypatch.setitem(autodiff._DUAL_ROUTE, "usable", True)
    routes = []
    for name in ("_fwd_rev_dual", "_fwd_rev_func"):
        real = getattr(autodiff, name)
        monkeypatch.setattr(autodiff, name,
                            lambda *a, _r=real, _n=name: routes.append(_n) or _r(*a))  # fmt: skip
    hv = autodiff.hvp(_quartic, (x, y), u, "fwd_rev")
    torch.testing.assert_close(torch.cat(hv), expected, rtol=1e-12, atol=1e-12)
    assert routes == ["_fwd_rev_dual"]
    xs = torch.stack([x, 2 * x])
    batched = torch.func.vmap(lambda xi: autodiff.hvp(_quartic, (xi, y), u, "fwd_rev"))(xs)
    assert routes[1:] == ["_fwd_rev_func"]
    for i in range(2):
        want = _dense_hessian(xs[i], y) @ torch.cat(u)
        torch.testing.assert_close(torch.cat([batched[0][i], batched[1][i]]), want,
                                   rtol=1e-12, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev", "fwd_rev under vmap"])
def test_hvp_of_a_function_that_ignores_its_primals_is_zero(mode: str) -> None:
    x = torch.randn(3, dtype=torch.float64)

    def hvp(x):
        f = lambda x: torch.ones((), dtype=torch.float64)  # noqa: E731
        return autodiff.hvp(f, (x,), (torch.ones(3, dtype=torch.float64),), mode.split()[0])[0]

    hv = torch.func.vmap(hvp)(x[None])[0] if "vmap" in mode else hvp(x)
    torch.testing.assert_close(hv, torch.zeros(3, dtype=torch.float64))


def test_fwd_rev_falls_back_to_torch_func_for_an_op_without_a_forward_formula(
    monkeypatch,
) -> None:
    """SiLU's backward (aten::silu_backward) has no forward-mode formula in PyTorch: the
    dual-tensor route raises there, so hvp warns once and takes torch.func's jvp of grad (which
    decomposes the op), for this call and every later one."""
    from theria import _warnings

    monkeypatch.setitem(autodiff._DUAL_ROUTE, "usable", True)
    _warnings.forget("autodiff:fwd_rev-dual")
    x = torch.randn(5, dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)

    def f(x):
        return torch.nn.functional.silu(x).pow(3).sum()

    want = autodiff.hvp(f, (x,), (u,), "rev_rev")
    with pytest.warns(RuntimeWarning, match="silu_backward.*torch.func's jvp of grad"):
        got = autodiff.hvp(f, (x,), (u,), "fwd_rev")
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    assert autodiff._DUAL_ROUTE["usable"] is False
    routes = []
    real = autodiff._fwd_rev_func
    monkeypatch.setattr(autodiff, "_fwd_rev_func", lambda *a: routes.append(1) or real(*a))
    torch.testing.assert_close(autodiff.hvp(f, (x,), (u,), "fwd_rev")[0], want[0])
    assert routes == [1]  # straight to torch.func, no second failed attempt


@pytest.mark.parametrize("route", ["dual tensors", "torch.func under vmap"])
def test_fwd_rev_backward_starts_from_a_dual_seed(route: str, monkeypatch) -> None:
    """With autograd's plain seed, the loss's backward steps (grad * x) mix a plain tensor with
    a dual one, and PyTorch (2.14 here) runs the ZeroTensor arithmetic of each such op through
    torch._refs (0.1-0.25 ms of host time an op): 94 such Python calls for this f with torch
    2.14 and the plain seed. A dual seed with a zero tangent keeps them out: f itself has no
    op that mixes the two. torch.func's route (under vmap) takes the seed as a primal of its
    jvp, with a zero tangent."""
    x = torch.randn(4, 3, dtype=torch.float64)
    u = torch.randn(4, 3, dtype=torch.float64)

    def f(x):
        y = torch.tanh(x)
        return (y * y).sum()

    routes = []
    for name in ("_fwd_rev_dual", "_fwd_rev_func"):
        real = getattr(autodiff, name)
        monkeypatch.setattr(autodiff, name, lambda *a, real=real, name=name: routes.append(name)
                            or real(*a))  # fmt: skip
    monkeypatch.setitem(autodiff._DUAL_ROUTE, "usable", True)

    def fwd_rev() -> Tensor:
        if route == "dual tensors":
            return autodiff.hvp(f, (x,), (u,), "fwd_rev")[0]
        return torch.func.vmap(lambda xi: autodiff.hvp(f, (xi,), (u,), "fwd_rev")[0])(x[None])[0]

    fwd_rev()  # warm-up: imports, first-call paths
    assert refs_calls(fwd_rev) == 0
    assert set(routes) == {"_fwd_rev_dual" if route == "dual tensors" else "_fwd_rev_func"}
    torch.testing.assert_close(fwd_rev(), autodiff.hvp(f, (x,), (u,), "rev_rev")[0])


def _mse_breaks_forward_ad() -> bool:
    """Whether this PyTorch has pytorch/pytorch#123996 (forward-over-reverse through
    F.mse_loss(reduction="mean") raises "ZeroTensors are immutable")."""
    w = torch.ones(2, dtype=torch.float64)
    g = torch.func.grad(lambda w: torch.nn.functional.mse_loss(w, torch.zeros_like(w)))
    try:
        torch.func.jvp(g, (w,), (w,))
    except RuntimeError as e:
        return "ZeroTensors are immutable" in str(e)
    return False


def test_fwd_rev_through_mse_loss_mean_runs_as_rev_rev_where_pytorch_fails(monkeypatch) -> None:
    """F.mse_loss(reduction="mean") under forward-over-reverse fails inside PyTorch (#123996):
    the call and later calls of that function run as rev_rev, warned once; under vmap (no
    torch.autograd) it raises with the workaround. Where PyTorch has no such bug, fwd_rev runs
    and agrees."""
    from theria import _warnings

    _warnings.forget("autodiff:fwd_rev-zerotensor")
    monkeypatch.setattr(autodiff, "_ZERO_TENSOR_FNS", set())
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64)
    u = torch.randn(3, 2, dtype=torch.float64)

    def f(w):
        return torch.nn.functional.mse_loss(torch.tanh(x @ w), y)

    want = autodiff.hvp(f, (w,), (u,), "rev_rev")
    # the same Hessian-vector product written out, which forward mode takes on every torch
    written = autodiff.hvp(lambda w: (torch.tanh(x @ w) - y).pow(2).mean(), (w,), (u,), "fwd_rev")
    torch.testing.assert_close(written[0], want[0], rtol=1e-12, atol=1e-12)
    batched = torch.func.vmap(lambda wi: autodiff.hvp(f, (wi,), (u,), "fwd_rev")[0])
    if _mse_breaks_forward_ad():
        with pytest.warns(RuntimeWarning, match=r"123996.*run mode='rev_rev' instead"):
            got = autodiff.hvp(f, (w,), (u,), "fwd_rev")
        with pytest.raises(RuntimeError, match=r"under torch\.func.*123996.*reduction='sum'"):
            batched(w.expand(2, 3, 2).clone())
        # remembered: a later call of the same function goes straight to rev_rev
        tried = []
        real = autodiff._fwd_rev
        monkeypatch.setattr(autodiff, "_fwd_rev", lambda *a: tried.append(1) or real(*a))
        torch.testing.assert_close(autodiff.hvp(f, (w,), (u,), "fwd_rev")[0], want[0])
        assert tried == []
    else:
        got = autodiff.hvp(f, (w,), (u,), "fwd_rev")
        torch.testing.assert_close(batched(w.expand(2, 3, 2).clone())[1], want[0])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
