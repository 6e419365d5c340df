"""iMAML: the implicit meta-gradient against closed forms and dense float64 Hessian solves."""

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from tests.algos.helpers import markov_problem, rel, sinusoid_problem
from theria.algos import IMAML, conjugate_gradient
from theria.tasks import Episode


def linear_regression_tasks(n_tasks=2, d=5, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, 2 * n, d, generator=g, dtype=torch.float64)
    w = torch.randn(n_tasks, d, 1, generator=g, dtype=torch.float64)
    y = x @ w + 0.1 * torch.randn(n_tasks, 2 * n, 1, generator=g, dtype=torch.float64)
    return Episode(x[:, :n], y[:, :n], x[:, n:], y[:, n:], torch.arange(n_tasks), "mse")


def test_imaml_equals_the_closed_form_implicit_gradient_of_a_quadratic():
    """Support loss ‖Xw − y‖²/n is quadratic: φ*(θ) = (H + λI)⁻¹(λθ + 2Xᵀy/n), H = 2XᵀX/n.
    The exact meta-gradient is autograd through this closed form."""
    lam, d = 2.0, 5
    model = nn.Linear(d, 1, bias=False).double()
    tasks = linear_regression_tasks(d=d)
    theta = {"weight": torch.randn(1, d, dtype=torch.float64)}
    # inner GD on a λ_min ≥ λ-strongly convex problem with lr = 1/L converges like
    # (1 − λ/L)^steps; 400 steps reach float64 precision for these sizes
    h_max = max(
        float(torch.linalg.eigvalsh(2 * t.mT @ t / t.shape[0]).max()) for t in tasks.support_x
    )
    algo = IMAML(lam=lam, inner_steps=400, inner_lr=1 / (h_max + lam), cg_iters=d)
    res = algo(model, theta, tasks)
    want = torch.zeros(1, d, dtype=torch.float64)
    th = theta["weight"].detach().reshape(d).requires_grad_()
    for i in range(tasks.n_tasks):
        x, y, qx, qy = (t[i] for t in tasks.tensors())
        h = 2 * x.T @ x / x.shape[0]  # (d, d)
        phi = torch.linalg.solve(
            h + lam * torch.eye(d, dtype=h.dtype), lam * th + 2 * x.T @ y[:, 0] / x.shape[0]
        )
        loss = ((qx @ phi - qy[:, 0]) ** 2).mean()
        want += torch.autograd.grad(loss, th)[0].reshape(1, d) / tasks.n_tasks
    assert rel(res.grads, {"weight": want}) < 1e-10
    assert res.metrics["cg_residual_max"] < 1e-10  # CG is exact in d iterations
    assert res.metrics["inner_grad_norm"] < 1e-10


def dense_implicit_gradient(model, params, task, algo):
    """(I(1 + δ) + H/λ)⁻¹ ∇L_query(φ*) with the dense Hessian of the support loss at φ*."""
    kind = task.loss
    phi, _, _ = algo.solve_inner(model, kind, params, task.support_x, task.support_y)
    names = list(phi)
    shapes = [phi[k].shape for k in names]
    sizes = [phi[k].numel() for k in names]
    flat = torch.cat([phi[k].reshape(-1) for k in names])

    def unflat(v):
        return {k: t.reshape(s) for k, t, s in zip(names, v.split(sizes), shapes, strict=True)}

    def loss(v, x, y):
        return ((functional_call(model, unflat(v), (x,)) - y) ** 2).mean()

    h = torch.func.hessian(loss)(flat, task.support_x, task.support_y)  # (P, P)
    g = torch.func.grad(loss)(flat, task.query_x, task.query_y)  # (P,)
    a = (1 + algo.cg_damping) * torch.eye(len(flat), dtype=flat.dtype) + h / algo.lam
    assert torch.linalg.eigvalsh(a).min() > 0.05  # CG's precondition: A is SPD (well-posed)
    return unflat(torch.linalg.solve(a, g))


@pytest.mark.parametrize("hvp", ["rev_rev", "fwd_rev"])
def test_imaml_matches_a_dense_hessian_solve_on_a_small_network(hvp):
    model, tasks = sinusoid_problem(n_tasks=2, hidden=(8,))
    algo = IMAML(lam=5.0, inner_steps=20, inner_lr=0.02, cg_iters=60, cg_damping=0.1, hvp=hvp)
    params = algo.init_params(model)
    res = algo(model, params, tasks)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(tasks.n_tasks):
        for k, v in dense_implicit_gradient(model, params, tasks.task(i), algo).items():
            want[k] += v / tasks.n_tasks
    assert res.metrics["cg_residual_max"] < 1e-10
    assert rel(res.grads, want) < 1e-8  # the CG residual bound times cond(A) ≲ 1e2


def test_hvp_modes_and_vmap_agree_through_the_transformer():
    model, tasks = markov_problem("theria", n_tasks=2)
    ref_model, _ = markov_problem("reference", n_tasks=2)
    kw = {"lam": 2.0, "inner_steps": 3, "inner_lr": 0.1, "cg_iters": 3}
    rr = IMAML(**kw, hvp="rev_rev")
    params = rr.init_params(model)
    a = rr(model, params, tasks)
    b = IMAML(**kw, hvp="fwd_rev")(model, params, tasks)
    c = IMAML(**kw, hvp="fwd_rev", batching="vmap")(model, params, tasks)
    r = rr(ref_model, params, tasks)
    assert rel(b.grads, a.grads) < 1e-10 and rel(c.grads, a.grads) < 1e-10
    assert rel(a.grads, r.grads) < 1e-10  # theria attention = reference attention
    assert 0 < a.metrics["cg_residual"] < 1 and "query_acc" in a.metrics


def test_conjugate_gradient_solves_an_spd_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = {"x": torch.randn(6, generator=g, dtype=torch.float64)}
    x, res = conjugate_gradient(lambda v: {"x": a @ v["x"]}, b, iters=12)
    torch.testing.assert_close(x["x"], torch.linalg.solve(a, b["x"]), rtol=1e-10, atol=1e-12)
    assert res < 1e-10


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="fwd_rev"):
        IMAML(batching="vmap", hvp="rev_rev")
    with pytest.raises(ValueError, match="lam"):
        IMAML(lam=0.0)
    model, tasks = sinusoid_problem()
    params = IMAML().init_params(model) | {"inner_lr/net.0.weight": torch.ones(1)}
    with pytest.raises(ValueError, match="not model parameters"):
        IMAML()(model, params, tasks)
