"""The transformer: every attention path computes the same function; causality; embeddings."""

import pytest
import torch
from torch.func import functional_call

from theria.models import MLP, MLPConfig, Transformer, TransformerConfig

PATHS = ["theria", "theria_torch", "reference", "sdpa", "sdpa_math"]


def build(attn="reference", **kw):
    cfg = TransformerConfig(
        **({"dim": 16, "depth": 2, "heads": 2, "vocab_size": 7} | kw), attn=attn
    )
    return Transformer(cfg).double()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_paths_agree_in_float64(causal):
    ref = build(causal=causal)
    x = torch.randint(7, (3, 11))
    want = ref(x)
    for attn in PATHS:
        m = build(attn, causal=causal)
        got = functional_call(m, dict(ref.named_parameters()), (x,))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=attn)


def test_causal_outputs_ignore_the_future():
    m = build("theria", causal=True)
    x = torch.randint(7, (1, 10))
    y = x.clone()
    y[0, 6] = (x[0, 6] + 1) % 7
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


def test_patch_and_vector_embeddings():
    img = Transformer(
        TransformerConfig(
            dim=16, heads=2, embed="patches", patch_size=7, out_features=5, pool="mean"
        )
    )
    assert img(torch.rand(4, 1, 28, 28)).shape == (4, 5)
    vec = Transformer(
        TransformerConfig(dim=16, heads=2, embed="vectors", in_features=3, out_features=2)
    )
    assert vec(torch.rand(4, 9, 3)).shape == (4, 9, 2)
    assert MLP(MLPConfig(in_features=2, hidden=(8,), out_features=3))(torch.rand(5, 2)).shape == (
        5,
        3,
    )


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="attn"):
        TransformerConfig(vocab_size=4, attn="flash")
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerConfig(vocab_size=4, dim=10, heads=4)
    with pytest.raises(ValueError, match="int64"):
        build()(torch.rand(2, 5))
    with pytest.raises(ValueError, match="max_len"):
        build(max_len=4)(torch.randint(7, (1, 5)))
