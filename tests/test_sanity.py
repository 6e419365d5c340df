"""theria.sanity: the checks report small errors for healthy paths and catch a lost term."""

import math

import pytest

from tests.algos.helpers import markov_problem, sinusoid_problem
from theria.algos import FOMAML, MAML
from theria.sanity import sanity_checks


def test_healthy_transformer_checks_are_small():
    model, tasks = markov_problem("theria")
    algo = MAML(inner_steps=1, inner_lr=0.1)
    m = sanity_checks(model, algo.init_params(model).copy(), tasks, algo)
    assert set(m) == {
        "hvp_rev_vs_fwd",
        "hvp_rev_vs_fd",
        "hvp_fwd_vs_fd",
        "hvp_symmetry",
        "maml_fd_rel_err",
    }
    assert all(math.isfinite(v) for v in m.values())
    assert m["hvp_rev_vs_fwd"] < 1e-10 and m["hvp_symmetry"] < 1e-10
    # central differences with eps 1e-4 (HVP) / 1e-5 (meta-objective) in float64: O(eps²)
    assert m["hvp_rev_vs_fd"] < 1e-6 and m["maml_fd_rel_err"] < 1e-6


class LostSecondOrder(MAML):
    """A MAML that silently returns FO-MAML's gradient: what a path that drops the graph does."""

    def __call__(self, model, params, tasks):
        res = super().__call__(model, params, tasks)
        fo = FOMAML(inner_steps=self.inner_steps, inner_lr=self.inner_lr)(model, params, tasks)
        res.grads = fo.grads
        return res


@pytest.mark.parametrize("algo_cls", [MAML, LostSecondOrder])
def test_maml_check_detects_a_silently_first_order_gradient(algo_cls):
    model, tasks = sinusoid_problem(hidden=(16,))
    algo = algo_cls(inner_steps=2, inner_lr=0.1)
    err = sanity_checks(model, algo.init_params(model), tasks, algo)["maml_fd_rel_err"]
    if algo_cls is MAML:
        assert err < 1e-6
    else:
        assert err > 1e-3
