"""theria/attention/function.py's call-path shortcuts: the positional signature that spares
torch.autograd.Function.apply its argument binding, bound exactly as inspect binds."""

from __future__ import annotations

import inspect

import pytest

from theria.attention.function import Attention, AttentionBackward


@pytest.mark.parametrize("fn", [Attention.forward, AttentionBackward.forward])
def test_positional_signature_binds_as_inspect_does(fn) -> None:
    sig = inspect.signature(fn)
    plain = inspect.Signature(list(sig.parameters.values()))
    names = list(sig.parameters)
    args = tuple(range(len(names)))
    fast = sig.bind(*args)
    fast.apply_defaults()
    want = plain.bind(*args)
    assert (fast.args, fast.kwargs) == (want.args, want.kwargs)
    # keywords, missing and extra arguments take inspect's own path (and its errors)
    kw = sig.bind(*args[:-1], **{names[-1]: args[-1]})
    assert kw.args == want.args
    with pytest.raises(TypeError):
        sig.bind(*args[:-1])
    with pytest.raises(TypeError):
        sig.bind(*args, 99)
