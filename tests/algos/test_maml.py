"""MAML / FO-MAML / Meta-SGD semantics, in float64."""

import pytest
import torch
from torch.func import functional_call

from tests.algos.helpers import (
    dot,
    fd_directional,
    markov_problem,
    random_direction,
    rel,
    sinusoid_problem,
)
from theria.algos import FOMAML, LR_PREFIX, MAML


@pytest.mark.parametrize("inner_steps", [1, 3])
def test_maml_meta_gradient_is_the_derivative_of_the_meta_objective(inner_steps):
    model, tasks = sinusoid_problem()
    algo = MAML(inner_steps=inner_steps, inner_lr=0.05)
    params = algo.init_params(model)
    res = algo(model, params, tasks)
    for seed in (3, 4):
        u = random_direction(params, seed)
        fd = fd_directional(lambda p: algo(model, p, tasks).loss, params, u)
        # central difference in float64, eps = 1e-5: truncation ~eps²·|f'''| plus rounding
        # ~1e-16/eps; together far below 1e-6 of the derivative's size here
        assert abs(dot(res.grads, u) - fd) <= 1e-6 * max(abs(fd), 1e-3)


def test_maml_through_the_transformer_matches_finite_differences():
    model, tasks = markov_problem("theria")
    algo = MAML(inner_steps=2, inner_lr=0.1)
    params = algo.init_params(model)
    u = random_direction(params)
    fd = fd_directional(lambda p: algo(model, p, tasks).loss, params, u)
    assert abs(dot(algo(model, params, tasks).grads, u) - fd) <= 1e-6 * max(abs(fd), 1e-3)


def explicit_adapt(model, params, x, y, lr, steps):
    """An independent inner loop with torch.autograd (FO: no graph through the gradients)."""
    fast = {k: v.detach().requires_grad_() for k, v in params.items()}
    for _ in range(steps):
        loss = ((functional_call(model, fast, (x,)) - y) ** 2).mean()
        gs = torch.autograd.grad(loss, list(fast.values()))
        fast = {
            k: (v - lr * g).detach().requires_grad_()
            for (k, v), g in zip(fast.items(), gs, strict=True)
        }
    return fast


def test_fomaml_gradient_is_the_query_gradient_at_adapted_params_and_differs_from_maml():
    model, tasks = sinusoid_problem(n_tasks=2)
    fo, so = FOMAML(inner_steps=2, inner_lr=0.05), MAML(inner_steps=2, inner_lr=0.05)
    params = fo.init_params(model)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(tasks.n_tasks):
        t = tasks.task(i)
        fast = explicit_adapt(model, params, t.support_x, t.support_y, 0.05, 2)
        loss = ((functional_call(model, fast, (t.query_x,)) - t.query_y) ** 2).mean()
        for k, g in zip(fast, torch.autograd.grad(loss, list(fast.values())), strict=True):
            want[k] += g / tasks.n_tasks
    got = fo(model, params, tasks).grads
    assert rel(got, want) < 1e-12
    # the second-order term (−α H_support · ...) is not zero here: MAML differs clearly
    assert rel(so(model, params, tasks).grads, got) > 1e-3


def test_meta_sgd_learning_rates_get_the_right_gradient():
    model, tasks = sinusoid_problem(n_tasks=2, hidden=(8,))
    algo = MAML(inner_steps=2, inner_lr=0.03, learn_inner_lr=True)
    params = algo.init_params(model)
    assert {k for k in params if k.startswith(LR_PREFIX)} == {
        LR_PREFIX + k for k, _ in model.named_parameters()
    }
    res = algo(model, params, tasks)
    assert set(res.grads) == set(params)
    u = random_direction(params, 5)
    fd = fd_directional(lambda p: algo(model, p, tasks).loss, params, u)
    assert abs(dot(res.grads, u) - fd) <= 1e-6 * max(abs(fd), 1e-3)
    lr_grad = torch.cat([g.reshape(-1) for k, g in res.grads.items() if k.startswith(LR_PREFIX)])
    assert lr_grad.abs().max() > 0
    with pytest.raises(ValueError, match="init_params"):
        algo(model, dict(model.named_parameters()), tasks)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_over_tasks_equals_the_loop(first_order, monkeypatch):
    model, tasks = markov_problem("theria", n_tasks=3)
    seq = MAML(inner_steps=1, inner_lr=0.1, first_order=first_order, batching="sequential")
    vm = MAML(inner_steps=1, inner_lr=0.1, first_order=first_order, batching="vmap")
    params = seq.init_params(model)
    a = seq(model, params, tasks)
    monkeypatch.setattr("theria._warnings._warned", set())  # warn_once: once per process
    if first_order:
        b = vm(model, params, tasks)
    else:  # second order under torch.func: the memory cost is announced
        with pytest.warns(RuntimeWarning, match=r"batching='vmap'.*O\(L·S\) memory"):
            b = vm(model, params, tasks)
    assert rel(b.grads, a.grads) < 1e-12
    assert abs(a.metrics["query_acc"] - b.metrics["query_acc"]) < 1e-12
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)


def test_maml_with_theria_attention_equals_maml_with_reference():
    model, tasks = markov_problem("theria", n_tasks=2)
    ref_model, _ = markov_problem("reference", n_tasks=2)
    algo = MAML(inner_steps=2, inner_lr=0.1)
    params = algo.init_params(model)
    got, want = algo(model, params, tasks), algo(ref_model, params, tasks)
    assert rel(got.grads, want.grads) < 1e-12
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-13, atol=0)


def test_default_cpu_sdpa_fails_loudly_for_second_order_only():
    model, tasks = markov_problem("sdpa")
    params = MAML().init_params(model)
    with pytest.raises(RuntimeError, match=r"attn='sdpa'.*attn='theria'"):
        MAML(inner_steps=1, inner_lr=0.1)(model, params, tasks)
    with pytest.raises(RuntimeError, match=r"attn='sdpa'"):
        MAML(inner_steps=1, inner_lr=0.1, batching="vmap")(model, params, tasks)
    # first order needs no double backward: it runs, and equals FO-MAML through theria
    fo = FOMAML(inner_steps=1, inner_lr=0.1)
    theria_model, _ = markov_problem("theria")
    assert rel(fo(model, params, tasks).grads, fo(theria_model, params, tasks).grads) < 1e-10


def test_bad_arguments_are_named():
    model, tasks = sinusoid_problem()
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(inner_steps=0)
    with pytest.raises(ValueError, match="leading task dim"):
        MAML()(model, MAML().init_params(model), tasks.task(0))
    with pytest.raises(ValueError, match="lacks model parameters"):
        MAML()(model, {}, tasks)
