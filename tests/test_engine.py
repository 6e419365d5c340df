"""theria's derivative drivers run autograd's backward on the calling thread (theria/_engine.py)."""

from __future__ import annotations

import threading
from typing import ClassVar

import pytest
import torch

from theria import autodiff
from theria._engine import calling_thread


class _Probe(torch.autograd.Function):
    """Identity whose backward records the thread it runs on and autograd's threading flag."""

    seen: ClassVar[list[tuple[int, bool]]] = []

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        _Probe.seen.append((threading.get_ident(), torch._C._is_multithreading_enabled()))
        return g


def _loss(x: torch.Tensor, probe: bool = True) -> torch.Tensor:
    _Probe.seen.append((threading.get_ident(), torch._C._is_multithreading_enabled()))
    return ((_Probe.apply(x) if probe else x) ** 3).sum()


def test_calling_thread_sets_and_restores_the_flag() -> None:
    seen = []

    @calling_thread
    def f() -> None:
        seen.append(torch._C._is_multithreading_enabled())
        raise KeyError("inside")

    before = torch._C._is_multithreading_enabled()
    with pytest.raises(KeyError):
        f()
    assert seen == [False]
    assert torch._C._is_multithreading_enabled() == before


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev"])
def test_hvp_backward_runs_on_the_calling_thread(device: str, mode: str) -> None:
    """On CUDA PyTorch's default engine would run _Probe.backward on its device thread."""
    x = torch.randn(5, device=device, dtype=torch.float64)
    _Probe.seen.clear()
    # torch.func's forward-over-reverse needs a jvp rule, which the probe has not: there only
    # the loss records the flag
    hv = autodiff.hvp(
        lambda x: _loss(x, probe=mode == "rev_rev"), (x,), (torch.ones_like(x),), mode
    )
    torch.testing.assert_close(hv[0], 6 * x)  # d²/dx² Σ x³ = 6x, times a direction of ones
    assert len(_Probe.seen) >= (3 if mode == "rev_rev" else 1)  # the loss, two backwards
    assert all(t == threading.get_ident() and not flag for t, flag in _Probe.seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on the CPU autograd "
                    "always runs on the calling thread")  # fmt: skip
def test_default_engine_uses_a_worker_thread_on_cuda() -> None:
    """The premise of theria/_engine.py: without it, a CUDA backward leaves the calling thread."""
    x = torch.randn(5, device="cuda", requires_grad=True)
    _Probe.seen.clear()
    _loss(x).backward()
    assert _Probe.seen[0][0] == threading.get_ident()  # the loss, on this thread
    assert len(_Probe.seen) == 2 and _Probe.seen[1][0] != threading.get_ident()  # backward


@pytest.mark.parametrize("algo", ["maml", "imaml"])
def test_meta_learning_algorithms_run_on_the_calling_thread(algo: str) -> None:
    """MAML's and iMAML's meta-gradients (what MetaStep calls) run with the flag off, and the
    flag is back on afterwards."""
    from tests.algos.helpers import sinusoid_problem
    from theria.algos import IMAML, MAML

    model, tasks = sinusoid_problem(n_tasks=2)
    flags: list[bool] = []
    model.register_forward_pre_hook(lambda *_: flags.append(torch._C._is_multithreading_enabled()))
    alg = MAML(inner_lr=0.1, inner_steps=1) if algo == "maml" else IMAML(inner_lr=0.1)
    params = alg.init_params(model)
    result = alg(model, params, tasks)
    assert torch.isfinite(result.loss)
    assert flags and not any(flags)
    assert torch._C._is_multithreading_enabled()
