"""The task-batched meta-step (batching="batched", the default) against the per-task loop
(batching="sequential") in float64: meta-gradients, losses and metrics equal to 1e-12
relative, for FO-MAML, MAML (1 and 3 inner steps, Meta-SGD) and iMAML (both HVP modes), through
the transformer with attn = theria, reference, sdpa_math and through the MLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.algos.helpers import markov_problem, rel, sinusoid_problem
from theria.algos import FOMAML, IMAML, MAML
from theria.algos.common import resolve_batching

ALGOS = {
    "fomaml": lambda b: FOMAML(inner_steps=2, inner_lr=0.1, batching=b),
    "maml-1": lambda b: MAML(inner_steps=1, inner_lr=0.1, batching=b),
    "maml-3": lambda b: MAML(inner_steps=3, inner_lr=0.1, batching=b),
    "meta-sgd": lambda b: MAML(inner_steps=2, inner_lr=0.1, learn_inner_lr=True, batching=b),
    "imaml-rr": lambda b: IMAML(lam=2.0, inner_steps=3, inner_lr=0.1, cg_iters=3, batching=b),
    "imaml-fr": lambda b: IMAML(
        lam=2.0, inner_steps=3, inner_lr=0.1, cg_iters=3, hvp="fwd_rev", batching=b
    ),
}


def _compare(model: nn.Module, tasks, name: str) -> None:
    seq, bat = ALGOS[name]("sequential"), ALGOS[name]("batched")
    params = seq.init_params(model)
    a, b = seq(model, params, tasks), bat(model, params, tasks)
    assert set(a.grads) == set(b.grads) == set(params)
    assert rel(b.grads, a.grads) < 1e-12, name
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-12, atol=0)
    assert a.stats.keys() == b.stats.keys()
    for k in a.stats:
        torch.testing.assert_close(b.stats[k], a.stats[k], rtol=1e-10, atol=1e-14, msg=k)


@pytest.mark.parametrize("name", list(ALGOS))
@pytest.mark.parametrize("attn", ["theria", "reference", "sdpa_math"])
def test_batched_equals_sequential_through_the_transformer(attn: str, name: str) -> None:
    model, tasks = markov_problem(attn, n_tasks=3)
    _compare(model, tasks, name)


@pytest.mark.parametrize("name", list(ALGOS))
def test_batched_equals_sequential_through_the_mlp(name: str) -> None:
    model, tasks = sinusoid_problem(n_tasks=4)
    _compare(model, tasks, name)


def test_auto_is_batched_unless_the_model_opts_out() -> None:
    model, _ = sinusoid_problem()
    assert resolve_batching("auto", model) == "batched"

    class NoVmap(nn.Module):
        supports_task_vmap = False

    assert resolve_batching("auto", NoVmap()) == "sequential"
    with pytest.raises(ValueError, match="supports_task_vmap"):
        resolve_batching("batched", NoVmap())
    with pytest.raises(ValueError, match="batching must be one of"):
        MAML(batching="parallel")  # type: ignore[arg-type]


def test_batched_metrics_stay_on_the_device_as_tensors() -> None:
    model, tasks = markov_problem("theria", n_tasks=2)
    algo = MAML(inner_steps=1, inner_lr=0.1)
    res = algo(model, algo.init_params(model), tasks)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in res.stats.values())
    assert {"query_loss", "support_loss_pre", "query_acc"} <= set(res.metrics)
    assert isinstance(res.metrics["query_loss"], float)
