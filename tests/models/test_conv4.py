"""Conv4: shapes, batch statistics only, vmap over per-task parameters, and MAML's exact
second-order meta-gradient through it (float64)."""

import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from tests.algos.helpers import dot, fd_directional, random_direction, rel
from theria.algos import FOMAML, MAML
from theria.models import Conv4, Conv4Config
from theria.tasks import GlyphTasks


def small(**kw) -> Conv4:
    cfg = Conv4Config(**({"image_size": 12, "channels": 6, "out_features": 3} | kw))
    return Conv4(cfg).double()


def test_shapes_of_both_downsampling_modes():
    x = torch.rand(5, 1, 28, 28)
    assert Conv4(Conv4Config()).forward(x).shape == (5, 5)
    assert Conv4(Conv4Config(downsample="maxpool", out_features=20))(x).shape == (5, 20)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, 28, 28\)"):
        Conv4(Conv4Config())(torch.rand(5, 1, 27, 27))
    with pytest.raises(ValueError, match="downsample"):
        Conv4Config(downsample="avg")
    with pytest.raises(ValueError, match="channels"):
        Conv4Config(channels=0)


def test_no_buffers_and_batch_statistics_even_in_eval_mode():
    model = small()
    assert list(model.buffers()) == []
    x = torch.rand(7, 1, 12, 12, dtype=torch.float64)
    h = model.blocks[0].norm(model.blocks[0].conv(x))
    # normalized per channel over (B, H, W) with the batch's own statistics
    torch.testing.assert_close(h.mean((0, 2, 3)), torch.zeros(6, dtype=torch.float64))
    # unit variance up to eps = 1e-5 against the conv output's small variance
    torch.testing.assert_close(h.var((0, 2, 3), unbiased=False), torch.ones(6, dtype=torch.float64),
                               atol=5e-3, rtol=0)  # fmt: skip
    model.eval()  # no train/eval difference: the same function either way
    out_eval = model(x)
    model.train()
    assert torch.equal(out_eval, model(x))
    # and the reference: torch's BatchNorm2d in training mode without running stats
    bn = torch.nn.BatchNorm2d(6, track_running_stats=False).double()
    torch.testing.assert_close(h, bn(model.blocks[0].conv(x)), rtol=1e-12, atol=1e-12)


def test_vmap_over_per_task_params_equals_the_per_task_loop():
    """What the task-batched algorithms do: params with a leading task dim, one vmap."""
    models = [small() for _ in range(4)]  # 4 tasks, 4 different fast-weight sets
    stacked, _ = stack_module_state(models)  # name -> (T, ...)
    base = small()
    xs = torch.rand(4, 9, 1, 12, 12, dtype=torch.float64)  # (T, B, C, H, W)

    def f(p, x):
        return functional_call(base, p, (x,))

    batched = vmap(f)(stacked, xs)  # (T, B, out)
    looped = torch.stack([m(x) for m, x in zip(models, xs, strict=True)])
    assert batched.shape == (4, 9, 3)
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)

    # and its gradient (what torch.autograd.grad on the summed per-task losses sees)
    leaves = {k: v.detach().requires_grad_() for k, v in stacked.items()}
    g_batched = torch.autograd.grad(vmap(f)(leaves, xs).square().sum(), list(leaves.values()))
    for i, m in enumerate(models):
        g_i = torch.autograd.grad(m(xs[i]).square().sum(), list(m.parameters()))
        for gb, gl in zip(g_batched, g_i, strict=True):
            torch.testing.assert_close(gb[i], gl, rtol=1e-12, atol=1e-12)


def _tasks(n_tasks=2):
    sampler = GlyphTasks(n_way=3, k_shot=2, k_query=2, n_classes=30, image_size=12,
                         dtype=torch.float64)  # fmt: skip
    return sampler.sample("train", n_tasks, torch.Generator().manual_seed(4))


@pytest.mark.parametrize("batching", ["batched", "sequential", "vmap"])
def test_maml_second_order_meta_gradient_through_conv4_matches_finite_differences(batching):
    model, tasks = small(), _tasks()
    algo = MAML(inner_steps=1, inner_lr=0.4, batching=batching)
    params = algo.init_params(model)
    grads = algo(model, params, tasks).grads
    for seed in (3, 5):
        u = random_direction(params, seed)
        fd = fd_directional(lambda p: algo(model, p, tasks).loss, params, u)
        # float64 central difference, eps = 1e-5: O(eps²) truncation, ~1e-11 rounding
        assert abs(dot(grads, u) - fd) <= 1e-6 * max(abs(fd), 1e-3), (dot(grads, u), fd)
    # the second-order term is there: FO-MAML's gradient differs clearly
    fo = FOMAML(inner_steps=1, inner_lr=0.4).__call__(model, params, tasks).grads
    assert rel(fo, grads) > 1e-2


@pytest.mark.parametrize("algo_cls", [MAML, FOMAML])
def test_batched_vmapped_and_sequential_meta_steps_agree_through_conv4(algo_cls):
    model, tasks = small(), _tasks(3)
    seq = algo_cls(inner_steps=2, inner_lr=0.1, batching="sequential")
    params = seq.init_params(model)
    want = seq(model, params, tasks).grads
    for batching in ("batched", "vmap"):
        got = algo_cls(inner_steps=2, inner_lr=0.1, batching=batching)(model, params, tasks).grads
        assert rel(got, want) < 1e-10, batching
