"""MAML and iMAML through the transformer with attn="theria_triton" (the Triton kernels, run
by Triton's interpreter on the CPU) equal the reference path in float64."""

import os

import pytest

from tests.algos.helpers import markov_problem, rel
from theria.algos import IMAML, MAML

pytestmark = pytest.mark.triton_interpret


@pytest.mark.parametrize(
    "algo",
    [MAML(inner_steps=1, inner_lr=0.1), IMAML(lam=2.0, inner_steps=2, inner_lr=0.1, cg_iters=2)],
    ids=["maml", "imaml"],
)
def test_meta_gradient_through_triton_kernels_equals_reference(algo):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported (no GPU here)")
    model, tasks = markov_problem("theria_triton", n_tasks=1)
    ref, _ = markov_problem("reference", n_tasks=1)
    params = algo.init_params(model)
    got, want = algo(model, params, tasks), algo(ref, params, tasks)
    assert rel(got.grads, want.grads) < 1e-12  # float64, same math: agreement to rounding
