"""Test-time adaptation matches the algorithms' own inner loops; the interval helpers."""

from __future__ import annotations

import pytest
import torch

from theria.algos import FOMAML, IMAML, MAML
from theria.algos.common import set_loss
from theria.models import MLP, MLPConfig
from theria.tasks import SinusoidTasks
from theria.train.evaluate import adapt, adaptation_curve, evaluate_tasks


@pytest.mark.parametrize(
    "algo",
    [MAML(inner_steps=2, inner_lr=0.05), FOMAML(inner_steps=3, inner_lr=0.02),
     MAML(inner_steps=2, inner_lr=0.05, learn_inner_lr=True),
     IMAML(lam=2.0, inner_steps=4, inner_lr=0.05)],
)  # fmt: skip
def test_adapt_reaches_the_algorithms_query_loss(algo) -> None:
    model = MLP(MLPConfig(hidden=(8, 8))).double()
    params = algo.init_params(model)
    tasks = SinusoidTasks(k_shot=5, k_query=7, dtype=torch.float64).sample(
        "train", 1, torch.Generator().manual_seed(1)
    )
    meta_loss = algo(model, params, tasks).loss  # the query loss after the algo's inner loop
    sx, sy, qx, qy = (t[0] for t in tasks.tensors())
    phi = adapt(algo, model, "mse", params, sx, sy, algo.inner_steps)
    ours = set_loss(model, "mse", phi, qx, qy)[0]
    torch.testing.assert_close(ours, meta_loss, rtol=1e-12, atol=1e-12)


def test_evaluate_tasks_and_curve_agree() -> None:
    model = MLP(MLPConfig(hidden=(8,))).double()
    algo = MAML(inner_steps=1, inner_lr=0.01)
    params = algo.init_params(model)
    tasks = SinusoidTasks(dtype=torch.float64).sample("test", 3, torch.Generator().manual_seed(0))
    per_task = evaluate_tasks(algo, model, params, tasks, steps=3)
    curve = adaptation_curve(model, params, tasks, lr=0.01, steps=3)  # (3 tasks, 4 points)
    assert curve.shape == (3, 4)
    torch.testing.assert_close(per_task["query_loss_pre"], curve[:, 0], rtol=1e-12, atol=0)
    torch.testing.assert_close(per_task["query_loss_post"], curve[:, 3], rtol=1e-12, atol=0)
    assert bool((per_task["support_loss_post"] < per_task["support_loss_pre"]).all())
