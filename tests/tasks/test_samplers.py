"""Samplers: shapes, reproducibility from a seed, disjoint splits (procedural samplers)."""

import pytest
import torch

from theria.tasks import Episode, GlyphTasks, MarkovChainTasks, SinusoidTasks, task_loss


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_glyphs(**kw) -> GlyphTasks:
    return GlyphTasks(**({"n_way": 3, "k_shot": 2, "k_query": 3, "n_classes": 60} | kw))


SAMPLERS = {
    "sinusoid": lambda: SinusoidTasks(k_shot=5, k_query=7),
    "markov": lambda: MarkovChainTasks(vocab_size=5, seq_len=9, k_shot=2, k_query=3),
    "glyphs": small_glyphs,
}


@pytest.mark.parametrize("name", SAMPLERS)
def test_reproducible_from_generator_state(name):
    s = SAMPLERS[name]()
    a, b = s.sample("train", 3, gen(7)), s.sample("train", 3, gen(7))
    c = s.sample("train", 3, gen(8))
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, z) for x, z in zip(a.tensors(), c.tensors(), strict=True))
    # a second sampler built with the same arguments draws the same episodes
    assert torch.equal(
        SAMPLERS[name]().sample("val", 2, gen(1)).query_x, s.sample("val", 2, gen(1)).query_x
    )


def test_sinusoid_shapes_and_function():
    e = SinusoidTasks(k_shot=5, k_query=7).sample("train", 4, gen())
    assert e.support_x.shape == (4, 5, 1) and e.query_y.shape == (4, 7, 1) and e.loss == "mse"
    amp, phase = e.task_info[:, 0, None, None], e.task_info[:, 1, None, None]
    torch.testing.assert_close(e.support_y, amp * torch.sin(e.support_x - phase))
    assert e.support_x.abs().max() <= 5 and (amp >= 0.1).all() and (amp <= 5).all()
    assert (phase >= 0).all() and (phase <= torch.pi).all()


def test_sinusoid_splits_are_disjoint_regions():
    s = SinusoidTasks()
    cells = [set(s._cells[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, cells)) == s.grid**2 and len(set.union(*cells)) == s.grid**2
    for split in ("train", "val", "test"):
        e = s.sample(split, 200, gen(3))
        owners = {s.split_of(float(a), float(p)) for a, p in e.task_info.double()}
        assert owners == {split}


def test_markov_shapes_targets_and_disjoint_ids():
    s = MarkovChainTasks(vocab_size=5, seq_len=9, k_shot=2, k_query=3, n_train_tasks=50)
    e = s.sample("train", 4, gen())
    assert e.support_x.shape == (4, 2, 9) and e.query_y.shape == (4, 3, 9) and e.loss == "ce"
    assert e.support_x.dtype == torch.long and int(e.support_x.max()) < 5
    torch.testing.assert_close(e.support_x[..., 1:], e.support_y[..., :-1])  # y = x shifted
    seen = {}
    for split in ("train", "val", "test"):
        first, count = s.task_ids(split)
        ids = s.sample(split, 64, gen(5)).task_info
        assert ((ids >= first) & (ids < first + count)).all()
        seen[split] = set(ids.tolist())
    assert not (seen["train"] & seen["val"]) and not (seen["val"] & seen["test"])
    assert not (seen["train"] & seen["test"])


def test_markov_sequences_follow_the_chain():
    """Empirical transition frequencies of one chain approach its matrix."""
    s = MarkovChainTasks(vocab_size=3, seq_len=400, k_shot=8, k_query=1, logit_scale=1.0)
    e = s.sample("train", 1, gen())
    x, y = e.support_x[0].reshape(-1), e.support_y[0].reshape(-1)
    counts = torch.zeros(3, 3).index_put_((x, y), torch.ones(len(x)), accumulate=True)
    freq = counts / counts.sum(-1, keepdim=True)
    # 3200 transitions, ~1000 per row: binomial std ≤ 0.5/sqrt(1000) ≈ 0.016; 0.08 is 5 σ
    assert (freq - s.transition_matrix(int(e.task_info[0])).float()).abs().max() < 0.08


def test_glyph_shapes_labels_and_disjoint_classes():
    s = small_glyphs()
    e = s.sample("train", 2, gen())
    assert e.support_x.shape == (2, 6, 1, 28, 28) and e.query_x.shape == (2, 9, 1, 28, 28)
    assert e.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert e.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert e.support_x.min() >= 0 and e.support_x.max() <= 1 and e.support_x.std() > 0.1
    pool = s.pool
    ids = {k: set(pool.global_class_ids(k).tolist()) for k in ("train", "val", "test")}
    assert sum(map(len, ids.values())) == 60 and len(set.union(*ids.values())) == 60
    for split in ids:
        drawn = s.sample(split, 10, gen(2)).task_info.reshape(-1)
        assert set(drawn.tolist()) <= ids[split]


def test_glyph_instances_are_jittered_copies_of_one_class():
    s = small_glyphs()
    a = s.pool.render(4, torch.arange(6))  # (6, 1, 28, 28), one class
    b = s.pool.render(9, torch.arange(6))
    assert torch.equal(a, s.pool.render(4, torch.arange(6)))  # deterministic
    within = (a[:, None] - a[None]).abs().mean((-1, -2, -3))  # (6, 6)
    between = (a[:, None] - b[None]).abs().mean((-1, -2, -3))
    assert within.sum() / 30 < between.mean()  # instances of a class resemble each other more
    assert within[0, 1] > 0  # ...but are not identical


def test_glyph_augmentations():
    rot = small_glyphs(rotations=True)
    e = rot.sample("train", 20, gen())
    assert (e.task_info % 4 != 0).any()  # rotated classes are drawn
    shifted = small_glyphs(max_shift=3).sample("train", 1, gen())
    plain = small_glyphs().sample("train", 1, gen())
    assert shifted.support_x.shape == plain.support_x.shape
    # the shift only moves ink: each image keeps (almost) all of it
    torch.testing.assert_close(
        shifted.support_x.sum((-1, -2)), plain.support_x.sum((-1, -2)), rtol=0.1, atol=1.0
    )


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        SinusoidTasks().sample("dev", 1, gen())
    with pytest.raises(ValueError, match="n_tasks"):
        SinusoidTasks().sample("train", 0, gen())
    with pytest.raises(ValueError, match="n_way"):
        small_glyphs(n_way=50)
    with pytest.raises(ValueError, match="ce loss"):
        task_loss("ce", torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_episode_stack_and_task():
    e = SinusoidTasks(k_shot=2, k_query=3).sample("train", 3, gen())
    one = e.task(1)
    assert one.support_x.shape == (2, 1)
    back = Episode.stack([e.task(i) for i in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(back.tensors(), e.tensors(), strict=True))
    assert e.to(dtype=torch.float64).support_x.dtype == torch.float64
    other = SinusoidTasks(k_shot=4, k_query=3).sample("train", 1, gen()).task(0)
    with pytest.raises(ValueError, match=r"support_x differ in shape \(\[\(2, 1\), \(4, 1\)\]"):
        Episode.stack([e.task(0), other])
