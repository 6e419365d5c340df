"""MetaStep (theria.algos.step): the eager step equals the algorithm plus the optimizer, a
non-finite step is refused before its update, and on CUDA the captured graph replays the
eager step bit for bit (MAML and iMAML through attn=theria's Triton kernels)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.algos.helpers import markov_problem, rel
from theria.algos import IMAML, MAML
from theria.algos.step import MetaStep, NonFiniteStepError, capturable_optimizer


def _copy(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def test_eager_step_is_the_algorithm_then_the_optimizer() -> None:
    model, tasks = markov_problem("theria", n_tasks=3)
    algo = MAML(inner_steps=1, inner_lr=0.1)
    params = algo.init_params(model)
    mine, ref = _copy(params), _copy(params)
    step = MetaStep(algo, model, mine, torch.optim.Adam(list(mine.values()), lr=1e-2),
                    grad_clip=0.5)  # fmt: skip
    opt = torch.optim.Adam(list(ref.values()), lr=1e-2)
    for _ in range(3):
        stats = step(tasks)
        res = algo(model, ref, tasks)
        for k, p in ref.items():
            p.grad = res.grads[k]
        norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), 0.5)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(stats["grad_norm"], norm, rtol=1e-12, atol=0)
    assert rel(mine, ref) < 1e-14
    assert not step.graphed and "cpu" in (step.why_eager or "")


def test_a_non_finite_step_is_refused_before_its_update() -> None:
    model, tasks = markov_problem("theria", n_tasks=2)
    base = MAML(inner_steps=1, inner_lr=0.1)

    def poisoned(model, params, tasks):
        out = base(model, params, tasks)
        return dataclasses.replace(out, grads=out.grads | {"pos": out.grads["pos"] * float("inf")})

    params = base.init_params(model)
    before = {k: v.detach().clone() for k, v in params.items()}
    step = MetaStep(poisoned, model, params, torch.optim.SGD(list(params.values()), lr=0.1))
    with pytest.raises(NonFiniteStepError, match=r"meta-gradient of \['pos'\] at step 1"):
        step(tasks)
    assert all(torch.equal(before[k], v) for k, v in params.items())


def test_graph_mode_is_refused_where_it_cannot_work() -> None:
    model, _ = markov_problem("theria")
    params = MAML().init_params(model)
    opt = torch.optim.Adam(list(params.values()))
    with pytest.raises(ValueError, match="CUDA graphs need CUDA"):
        MetaStep(MAML(), model, params, opt, graph="on")
    with pytest.raises(ValueError, match="graph must be one of"):
        MetaStep(MAML(), model, params, opt, graph="yes")  # type: ignore[arg-type]
    assert "capturable=True" in (capturable_optimizer(opt, lr_changes=False) or "")
    sgd = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9)
    assert "momentum" in (capturable_optimizer(sgd, lr_changes=False) or "")
    assert capturable_optimizer(torch.optim.SGD(list(params.values()), lr=0.1), False) is None


@pytest.mark.gpu
@pytest.mark.parametrize("algo", [MAML(inner_steps=2, inner_lr=0.1),
                                  IMAML(lam=2.0, inner_steps=2, inner_lr=0.1, cg_iters=3)],
                         ids=["maml", "imaml"])  # fmt: skip
def test_cuda_graph_replays_the_eager_step_bit_for_bit(algo) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, tasks = markov_problem("theria", n_tasks=4)
    model = model.to("cuda", torch.bfloat16)
    params = algo.init_params(model)
    runs = {}
    for mode in ("off", "on"):
        p = _copy(params)
        lr = torch.tensor(1e-3, device="cuda")
        step = MetaStep(algo, model, p, torch.optim.Adam(list(p.values()), lr=lr,
                        capturable=True), graph=mode, grad_clip=1.0)  # fmt: skip
        for i in range(6):
            t = MarkovChainTasksFor(tasks, i)
            step(t.to("cuda"))
        step.check()
        torch.cuda.synchronize()
        runs[mode] = p
        assert step.graphed == (mode == "on")
    for k in params:
        assert torch.equal(runs["off"][k], runs["on"][k]), k


def MarkovChainTasksFor(tasks, i: int):
    """A different batch per step, of the same shapes (the graph's inputs are refilled)."""
    g = torch.Generator().manual_seed(100 + i)
    perm = torch.randperm(tasks.n_tasks, generator=g)
    return tasks._map(lambda t: t[perm])


@pytest.mark.gpu
def test_cuda_graph_non_finite_step_is_reported_by_check() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, tasks = markov_problem("theria", n_tasks=2)
    model = model.to("cuda", torch.float32)
    base = MAML(inner_steps=1, inner_lr=0.1)
    scale = torch.ones((), device="cuda")

    def poisoned(model, params, tasks):
        out = base(model, params, tasks)
        return dataclasses.replace(out, loss=out.loss * scale)

    params = base.init_params(model)
    opt = torch.optim.Adam(list(params.values()), lr=torch.tensor(1e-3, device="cuda"),
                           capturable=True)  # fmt: skip
    step = MetaStep(poisoned, model, params, opt, graph="on")
    cuda_tasks = tasks.to("cuda")
    for _ in range(4):
        step(cuda_tasks)
    step.check()
    scale.fill_(float("nan"))
    step(cuda_tasks)  # step 5 replays the graph with a NaN loss
    step(cuda_tasks)
    with pytest.raises(NonFiniteStepError, match="at step 5"):
        step.check()


@pytest.mark.gpu
def test_metasteps_one_after_another_leave_no_device_memory() -> None:
    """A sweep's jobs (or an experiment script's runs) build a MetaStep each in one process;
    what one leaves allocated after it is dropped must not grow from one to the next (each
    warm-up once took a new side stream: +128 MiB allocated per run on an H200)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import gc

    left = []
    for _ in range(4):
        model, tasks = markov_problem("theria", n_tasks=2)
        model, tasks = model.to("cuda", torch.float32), tasks.to("cuda")
        algo = MAML(inner_steps=1, inner_lr=0.1)
        params = algo.init_params(model)
        opt = torch.optim.Adam(list(params.values()), lr=torch.tensor(1e-3, device="cuda"),
                               capturable=True)  # fmt: skip
        step = MetaStep(algo, model, params, opt, graph="on")
        for _ in range(4):
            step(tasks)
        torch.cuda.synchronize()
        del model, tasks, params, opt, step
        gc.collect()
        left.append(torch.cuda.memory_allocated() / 2**20)
    assert left[-1] - left[1] < 1.0, left  # MiB; the first run may allocate lasting caches
