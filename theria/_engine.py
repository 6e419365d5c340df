"""Where autograd runs theria's backward passes: on the calling thread.

PyTorch's autograd engine hands the backward of a CUDA graph to a per-device worker thread by
default. For an operator whose backward is Python (every `torch.autograd.Function`, theria's
attention among them) that hand-off was measured at ~0.6 ms per forward + backward on an H200
host (torch 2.11): 1040 µs against 399 µs for the same call with
`torch.autograd.set_multithreading_enabled(False)` at a size whose GPU work is ~10 µs
(experiments/results/host_overhead_h200.md). The worker thread buys nothing when one device
holds the whole graph (PyTorch's own pytorch/pytorch#192004 and #192082 propose running such
graphs on the calling thread).

`calling_thread` wraps theria's own derivative drivers (`theria.autodiff`, the meta-learning
algorithms, the meta-step) so that their backward passes stay on the caller's thread. It sets a
thread-local autograd flag for the duration of the call and restores it after; it does not
change how a user's own `loss.backward()` runs (README: "Per-call overhead").

`tangents_not_differentiated` marks a region whose forward-mode tangents no reverse pass will
differentiate (theria's forward-over-reverse HVP driver, `theria.autodiff.hvp`): there a JVP step
may run the kernels while autograd records the primal graph around it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def calling_thread(fn: F) -> F:
    """Decorator: run `fn` with autograd's backward passes on the calling thread."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.autograd.set_multithreading_enabled(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


_state = threading.local()


@contextlib.contextmanager
def tangents_not_differentiated() -> Iterator[None]:
    """Within (this thread): no reverse pass differentiates the forward-mode tangents made here.

    A JVP step taken while autograd records a graph (grad mode on, inputs requiring grad) must
    otherwise assume reverse-over-forward, a backward through the tangent itself, and so runs
    differentiable torch ops instead of kernels. Forward-over-reverse with dual tensors records
    the primal graph for its reverse pass and reads the tangent of the gradient only: its
    tangents are never differentiated, which this context tells the attention's JVP step. The
    function run inside must not read this level's tangents as values (`unpack_dual`)."""
    before = getattr(_state, "tangents_plain", False)
    _state.tangents_plain = True
    try:
        yield
    finally:
        _state.tangents_plain = before


def tangents_may_be_differentiated() -> bool:
    """False inside `tangents_not_differentiated` (on this thread), True elsewhere, and True
    under a torch.func transform even inside it: a `torch.func.jvp` within the function makes
    its tangent an ordinary value, which the enclosing reverse pass may differentiate."""
    if not getattr(_state, "tangents_plain", False):
        return True
    return torch._C._are_functorch_transforms_active()
