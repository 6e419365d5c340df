"""override_sdpa: F.scaled_dot_product_attention -> theria.sdpa inside the block (context
manager and decorator), nn.TransformerEncoderLayer's derivatives through it in float64, and
nothing changed afterwards, also after an exception."""

import contextlib
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria._warnings import forget

ORIGINAL_SDPA = F.scaled_dot_product_attention
ORIGINAL_MHA = F.multi_head_attention_forward


def _unchanged() -> bool:
    return (
        F.scaled_dot_product_attention is ORIGINAL_SDPA
        and F.multi_head_attention_forward is ORIGINAL_MHA
        and torch.backends.mha.get_fastpath_enabled()
    )


def _spy():
    return mock.patch("theria.attention.override.sdpa", wraps=theria.sdpa)


def test_calls_inside_run_theria_with_the_same_arguments():
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    kv = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    with _spy() as calls, theria.override_sdpa(backend="reference"):
        a = F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, 0.5)
        b = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True,
                                                             enable_gqa=True)  # fmt: skip
    assert calls.call_count == 2
    assert calls.call_args_list[0].args[3] is mask and calls.call_args_list[0].args[6] == 0.5
    assert calls.call_args_list[0].kwargs["backend"] == "reference"
    assert calls.call_args_list[1].args[5] is True and calls.call_args_list[1].args[7] is True
    with sdpa_kernel(SDPBackend.MATH):
        assert (a - F.scaled_dot_product_attention(q, k, v, mask, scale=0.5)).abs().max() < 1e-12
        ref = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        assert (b - ref).abs().max() < 1e-12
    assert _unchanged()


def test_restored_after_the_block_after_an_exception_and_when_nested():
    assert _unchanged()
    with theria.override_sdpa():
        assert F.scaled_dot_product_attention is not ORIGINAL_SDPA
        assert not torch.backends.mha.get_fastpath_enabled()
        inner = theria.override_sdpa(backend="reference")
        with inner:
            assert F.scaled_dot_product_attention == inner._sdpa
        assert F.scaled_dot_product_attention != inner._sdpa  # the outer one again
        assert not torch.backends.mha.get_fastpath_enabled()
    assert _unchanged()
    with pytest.raises(KeyError), theria.override_sdpa():
        raise KeyError("boom")
    assert _unchanged()
    torch.backends.mha.set_fastpath_enabled(False)  # a user's own setting is kept, too
    try:
        with theria.override_sdpa():
            pass
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_decorator_also_when_recursive_and_raising():
    @theria.override_sdpa()
    def attend(q, depth):
        assert F.scaled_dot_product_attention is not ORIGINAL_SDPA
        if depth == 0:
            raise ValueError("bottom")
        return attend(q, depth - 1)

    with _spy() as calls, pytest.raises(ValueError, match="bottom"):
        attend(torch.zeros(1), 2)
    assert calls.call_count == 0 and _unchanged()

    @theria.override_sdpa()
    def call(q):
        return F.scaled_dot_product_attention(q, q, q)

    with _spy() as calls:
        call(torch.randn(1, 2, 3, 4))
    assert calls.call_count == 1 and _unchanged()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'flash'"):
        theria.override_sdpa(backend="flash")
    with pytest.raises(ValueError, match="block_size must be a positive int; got -1"):
        theria.override_sdpa(block_size=-1)


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
    return layer.to(torch.float64).eval()


def _derivatives(layer: nn.Module, context) -> dict[str, torch.Tensor]:
    """HVP by double backward and forward-over-reverse, the JVP of the output, and a
    one-step MAML meta-gradient, of <layer(x), W> over the layer's parameters."""
    g = torch.Generator().manual_seed(1)
    x, xq = (torch.randn(2, 6, 16, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, -2:] = True  # key padding: the last two tokens of sequence 0 are padding
    params = {k: p.detach().clone().requires_grad_() for k, p in layer.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}

    def out(p, data=x):
        return functional_call(layer, p, (data,), {"src_key_padding_mask": mask})

    def loss(p, data=x):
        return (out(p, data) * w).sum()

    leaves = list(params.values())

    def grad(y, create_graph=False):  # zeros where y does not depend on a leaf
        gs = torch.autograd.grad(y, leaves, create_graph=create_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, gs, strict=True)]

    flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])  # noqa: E731
    r = {}
    with context:
        gr = grad(loss(params), create_graph=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(gr, params, strict=True))
        r["hvp_rev_rev"] = flat(grad(dot))
        r["hvp_fwd_rev"] = flat(torch.func.jvp(torch.func.grad(loss), (params,), (v,))[1].values())
        r["jvp"] = torch.func.jvp(out, (params,), (v,))[1].detach().flatten()
        gs = grad(loss(params), create_graph=True)
        fast = {k: p - 0.1 * gi for (k, p), gi in zip(params.items(), gs, strict=True)}
        r["maml"] = flat(grad(loss(fast, xq)))
    return r


@contextlib.contextmanager
def _math_path():
    """The oracle: PyTorch's math SDPA, with the fused fast path off (under torch.func.jvp the
    layer would take it, and aten::_transformer_encoder_layer_fwd has no forward AD)."""
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_encoder_layer_derivatives_under_override_match_the_math_path():
    layer = _encoder_layer()
    with _spy() as calls:
        got = _derivatives(layer, theria.override_sdpa())
    assert calls.call_count == 5  # every forward (5) went through theria
    expected = _derivatives(layer, _math_path())
    for key, ref in expected.items():
        assert ref.norm() > 0
        assert float((got[key] - ref).norm() / ref.norm()) < 1e-10, key
    assert _unchanged()


def test_encoder_layer_without_override_cannot_take_second_derivatives():
    """What the override fixes: PyTorch's default CPU kernel has no double backward."""
    with pytest.raises(RuntimeError, match=r"derivative for .* is not implemented"):
        _derivatives(_encoder_layer(), warnings.catch_warnings())


def test_fused_fast_path_goes_through_theria_inside():
    """Eval mode without gradients is where nn.TransformerEncoder(Layer) and
    nn.MultiheadAttention take PyTorch's fused kernels; inside the block they call SDPA."""
    layer = _encoder_layer()
    encoder = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=False)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).to(torch.float64).eval()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad(), _spy() as calls, theria.override_sdpa():
        layer(x)
        encoder(x)
        mha(x, x, x, need_weights=False)
    assert calls.call_count == 4


def test_need_weights_true_bypass_is_announced():
    forget("override_sdpa:need_weights")
    mha = nn.MultiheadAttention(16, 4, batch_first=True).to(torch.float64)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with _spy() as calls, theria.override_sdpa():
        with pytest.warns(RuntimeWarning, match="need_weights=True .* theria is bypassed"):
            mha(x, x, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mha(x, x, x, need_weights=False)
    assert calls.call_count == 1
