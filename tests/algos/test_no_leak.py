"""Memory stays flat over hundreds of MAML and iMAML meta-steps.

Unrolled inner loops are where meta-learning code leaks (a graph kept alive from one step to
the next). The detector is the resident set size: after a warm-up, it may not grow by more than
`BUDGET_MB` over `STEPS` meta-steps. One step's graph here holds about 1 MB of activations
(wide MLP, many support points: the leaky control below grows ~1.1 MB per step, ~220 MB over
the run, measured), so keeping even a tenth of it per step would exceed the budget; the real
algorithms grew < 0.5 MB over such runs. `test_the_detector_sees_a_leak` runs the control.
"""

import gc

import pytest
import torch

from theria.algos import IMAML, MAML
from theria.models import MLP, MLPConfig
from theria.tasks import SinusoidTasks

STEPS = 200
BUDGET_MB = 20.0


def rss_mb() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def setup():
    model = MLP(MLPConfig(hidden=(256, 256)))
    tasks = SinusoidTasks(k_shot=100, k_query=100).sample(
        "train", 2, torch.Generator().manual_seed(0)
    )
    return model, tasks


def growth(step) -> float:
    for _ in range(20):  # warm-up: allocator caches, lazy init
        step()
    before = rss_mb()
    for _ in range(STEPS):
        step()
    return rss_mb() - before


@pytest.mark.parametrize(
    "algo",
    [MAML(inner_steps=2, inner_lr=0.01), IMAML(lam=1.0, inner_steps=2, inner_lr=0.01, cg_iters=2)],
    ids=["maml", "imaml"],
)
def test_memory_is_flat_over_meta_steps(algo):
    model, tasks = setup()
    params = algo.init_params(model)
    opt = torch.optim.SGD(list(params.values()), lr=1e-3)

    def step():
        res = algo(model, params, tasks)
        for k, p in params.items():
            p.grad = res.grads[k]
        opt.step()

    assert growth(step) < BUDGET_MB


def test_the_detector_sees_a_leak():
    """Keeping each step's meta-loss with its graph (a classic leak) is caught."""
    model, tasks = setup()
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    kept = []

    def leaky_step():
        x, y = tasks.support_x[0], tasks.support_y[0]
        loss = ((torch.func.functional_call(model, params, (x,)) - y) ** 2).mean()
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        fast = {k: v - 0.01 * gi for (k, v), gi in zip(params.items(), g, strict=True)}
        kept.append(((torch.func.functional_call(model, fast, (x,)) - y) ** 2).mean())

    assert growth(leaky_step) > BUDGET_MB
