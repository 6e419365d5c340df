"""Tiny Hugging Face models built from config (no download) and the derivatives the tests
compare across attention implementations. float64 throughout, eval mode (no dropout)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from unittest import mock

import torch
import transformers
from torch import Tensor
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria.hf

Params = dict[str, Tensor]

VOCAB, LENGTH, BATCH = 37, 12, 2
_SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _auto(auto, config) -> transformers.PreTrainedModel:
    return auto.from_config(config, attn_implementation="eager")


def _causal_lm(cls, **kw) -> Callable[[], transformers.PreTrainedModel]:
    config = cls(vocab_size=VOCAB, max_position_embeddings=64, **_SIZES, **kw)
    return lambda: _auto(transformers.AutoModelForCausalLM, config)


ARCHS: dict[str, Callable[[], transformers.PreTrainedModel]] = {
    "llama": _causal_lm(transformers.LlamaConfig, num_key_value_heads=2),
    "gpt2": lambda: _auto(transformers.AutoModelForCausalLM, transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=48,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True,
        bos_token_id=0, eos_token_id=0,
    )),
    # GQA and a sliding window of 4 keys (shorter than the sequence) on every layer
    "mistral": _causal_lm(transformers.MistralConfig, num_key_value_heads=1, sliding_window=4),
    # layer 0 full attention, layer 1 a sliding window of 5
    "qwen2": _causal_lm(
        transformers.Qwen2Config, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=5, max_window_layers=1,
    ),
    "bert": lambda: _auto(transformers.AutoModelForMaskedLM, transformers.BertConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **_SIZES,
    )),
    # 16 patches + [CLS] = 17 tokens
    "vit": lambda: _auto(transformers.AutoModelForImageClassification, transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=3, num_labels=5, **_SIZES
    )),
}  # fmt: skip


def build(arch: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    return ARCHS[arch]().to(torch.float64).eval()


def inputs(arch: str, seed: int) -> dict[str, Tensor]:
    """Model inputs: tokens (B, L) (BERT with right padding of 4 on the first sequence, Llama
    with left padding of 3 on the second), or pixels (B, 3, 8, 8) for ViT."""
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 8, 8, generator=g, dtype=torch.float64)}
    x = {"input_ids": torch.randint(VOCAB, (BATCH, LENGTH), generator=g)}
    if arch == "bert":
        mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
        mask[0, -4:] = 0
        x["attention_mask"] = mask
    return x


def readout(arch: str, seed: int = 7) -> Tensor:
    """A fixed weighting W of the logits: the scalar loss is <logits, W>."""
    shape = (BATCH, 5) if arch == "vit" else (BATCH, LENGTH, VOCAB)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def implementation(model: transformers.PreTrainedModel, name: str):
    """Switches `model` to attention `name` ("theria", "eager", or "math": transformers' SDPA
    path under sdpa_kernel(MATH), the explicit composition in the model's dtype, which is
    exact in float64) and returns the context to run it in."""
    model.set_attn_implementation("sdpa" if name == "math" else name)
    return sdpa_kernel(SDPBackend.MATH) if name == "math" else nullcontext()


def params_of(model: transformers.PreTrainedModel) -> Params:
    return {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}


def direction(params: Params, seed: int = 3) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def logits_fn(model, x: dict[str, Tensor]) -> Callable[[Params], Tensor]:
    return lambda p: functional_call(model, p, (), x).logits


def derivatives(arch: str, model, name: str) -> dict[str, Tensor]:
    """Every derivative the acceptance asks for, flattened: the HVP of the loss by double
    backward and by forward-over-reverse (torch.func.jvp of torch.func.grad), the JVP of the
    logits (torch.func.jvp), and a one-step MAML meta-gradient (support -> query)."""
    x, xq, w = inputs(arch, 0), inputs(arch, 1), readout(arch)
    params = params_of(model)
    v = direction(params)

    def loss(p: Params, data=x) -> Tensor:
        return (logits_fn(model, data)(p) * w).sum()

    out: dict[str, Tensor] = {}
    spy = mock.patch("theria.hf.sdpa", wraps=theria.hf.sdpa)
    with implementation(model, name), spy as calls:
        out["logits"] = logits_fn(model, x)(params).detach()
        g = _grad(loss(params), params, create_graph=True)
        dot = sum((gi * v[k]).sum() for gi, k in zip(g, params, strict=True))
        out["hvp_rev_rev"] = _flat(_grad(dot, params))
        _, hv = torch.func.jvp(torch.func.grad(loss), (params,), (v,))
        out["hvp_fwd_rev"] = _flat(hv.values())
        _, jv = torch.func.jvp(logits_fn(model, x), (params,), (v,))
        out["jvp"] = jv.detach().flatten()
        # MAML, one inner step of 0.1 on the support loss, then the query loss
        gs = _grad(loss(params), params, create_graph=True)
        fast = {k: p - 0.1 * gi for (k, p), gi in zip(params.items(), gs, strict=True)}
        out["maml"] = _flat(_grad(loss(fast, xq), params))
    # theria.sdpa ran in every layer of every forward (6 of them), and only for "theria"
    layers = model.config.num_hidden_layers
    assert calls.call_count == (6 * layers if name == "theria" else 0), calls.call_count
    return out


def _grad(out: Tensor, params: Params, create_graph: bool = False) -> list[Tensor]:
    """d out / d params; zeros for parameters the output does not use (BERT's pooler)."""
    gs = torch.autograd.grad(
        out, list(params.values()), create_graph=create_graph, allow_unused=True
    )
    return [
        torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), gs, strict=True)
    ]


def _flat(ts) -> Tensor:
    return torch.cat([t.detach().flatten() for t in ts])


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())
