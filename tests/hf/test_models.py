"""float64: theria's attention inside whole Hugging Face models gives the same HVPs (double
backward, forward-over-reverse), JVPs and MAML meta-gradients as the explicit composition
(transformers' SDPA path under the math kernel) and, where it computes in float64, eager."""

import pytest
import torch

from tests.hf.models import ARCHS, build, derivatives, inputs, readout, rel

TOL = 1e-10


@pytest.fixture(scope="module")
def results():
    """(arch, attention) -> derivatives, computed once per module."""
    cache: dict = {}

    def get(arch: str, name: str):
        if (arch, name) not in cache:
            cache[arch, name] = derivatives(arch, build(arch), name)
        return cache[arch, name]

    return get


@pytest.mark.parametrize("arch", list(ARCHS))
def test_theria_matches_math_path(arch, results):
    theria, oracle = results(arch, "theria"), results(arch, "math")
    for key in ("logits", "hvp_rev_rev", "hvp_fwd_rev", "jvp", "maml"):
        assert oracle[key].norm() > 0, key  # a zero oracle would make the check vacuous
        assert rel(theria[key], oracle[key]) < TOL, (arch, key, rel(theria[key], oracle[key]))


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_theria_matches_eager(arch, results):
    """GPT-2's and BERT's eager attention computes in the model's dtype (float64 here)."""
    theria, eager = results(arch, "theria"), results(arch, "eager")
    for key, value in eager.items():
        assert rel(theria[key], value) < TOL, (arch, key, rel(theria[key], value))


def test_llama_eager_is_not_a_float64_oracle(results):
    """Llama-family eager attention takes its softmax in float32, so in float64 it differs
    from the exact composition by ~1e-8: why the oracle above is the math path."""
    eager, oracle = results("llama", "eager"), results("llama", "math")
    assert 1e-12 < rel(eager["logits"], oracle["logits"]) < 1e-5


def test_padding_reaches_the_attention(results):
    """BERT's padding mask changes the result (so the test above exercised a real mask)."""
    model = build("bert")
    x = inputs("bert", 0)
    model.set_attn_implementation("theria")
    padded = model(**x).logits
    unmasked = model(input_ids=x["input_ids"]).logits
    assert (padded[1] - unmasked[1]).abs().max() < 1e-12  # the unpadded sequence
    assert (padded[0] - unmasked[0]).abs().max() > 1e-6


def test_sliding_window_reaches_the_attention():
    """Mistral's window of 4 keys changes the logits from full causal attention."""
    model = build("mistral")
    x = inputs("mistral", 0)
    model.set_attn_implementation("theria")
    windowed = model(**x).logits
    model.config.sliding_window = None
    full = model(**x).logits
    assert (windowed[:, :4] - full[:, :4]).abs().max() < 1e-12  # the window covers the prefix
    assert (windowed[:, 4:] - full[:, 4:]).abs().max() > 1e-6


def test_sdpa_default_cannot_take_the_hvp():
    """Through transformers' SDPA path and PyTorch's default (fused) kernel the double
    backward raises on the CPU: what theria replaces."""
    model = build("llama")
    model.set_attn_implementation("sdpa")
    params = dict(model.named_parameters())
    loss = (model(**inputs("llama", 0)).logits * readout("llama")).sum()
    g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    with pytest.raises(RuntimeError, match=r"derivative for .* is not implemented"):
        torch.autograd.grad(sum(gi.sum() for gi in g), list(params.values()))
