"""A Hugging Face causal language model as a theria model: (B, L) int64 tokens -> (B, L, V)
logits, used through `torch.func.functional_call` like `Transformer`.

    model = HFCausalLM(HFModelConfig(arch="llama", vocab_size=16, max_len=64, attn="theria"))
    logits = torch.func.functional_call(model, params, (tokens,))    # (B, L, vocab_size)

Built from config by architecture (``arch`` + sizes: no download, random init from torch's
global RNG) or loaded from a local pretrained folder (``path``, offline). Its attention is
chosen by name (`HF_ATTENTION`): theria's paths run through ``theria.hf``'s registered
``attn_implementation``; ``eager`` and ``sdpa`` are transformers' own; ``sdpa_math`` is
``sdpa`` on PyTorch's math kernel. Dropout is off (built with probability 0; a pretrained model
is put in eval mode), so every pass is deterministic, as the meta-gradient checks need.

transformers is imported when a model is built, never by ``import theria``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from theria.attention import DEFAULT_BLOCK_SIZE

HF_ARCHS: tuple[str, ...] = ("llama", "gpt2", "qwen2", "mistral")
# attention name -> (theria.hf backend, or None for transformers' own implementation)
_THERIA = {"theria": "auto", "theria_torch": "torch", "theria_triton": "triton",
           "reference": "reference"}  # fmt: skip
HF_ATTENTION: tuple[str, ...] = (*_THERIA, "eager", "sdpa", "sdpa_math")
SLIDING_ARCHS = ("qwen2", "mistral")  # the architectures with a sliding-window option


@dataclass(frozen=True)
class HFModelConfig:
    """arch: one of HF_ARCHS (ignored when `path` is set); path: a local folder holding a
    pretrained causal LM (config.json + weights); vocab_size: logits kept (the first
    vocab_size token ids; a pretrained vocabulary must be at least that large); max_len:
    positions (from config only); dim, depth, heads, mlp_ratio: width, blocks, query heads,
    MLP width / dim; kv_heads: key/value heads (GQA; 0: = heads; GPT-2 has no GQA);
    sliding_window: keys each query sees (0: all; qwen2 and mistral only); attn: one of
    HF_ATTENTION; block_size: keys per block for theria's torch backend."""

    arch: str = "llama"
    path: str | None = None
    vocab_size: int = 8
    max_len: int = 64
    dim: int = 32
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    kv_heads: int = 0
    sliding_window: int = 0
    attn: str = "theria"
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.attn not in HF_ATTENTION:
            raise ValueError(f"attn must be one of {list(HF_ATTENTION)}; got {self.attn!r}")
        if self.path is not None:
            if not (Path(self.path) / "config.json").is_file():
                raise ValueError(
                    f"path={self.path!r} is not a pretrained model folder (no config.json)"
                )
            return
        if self.arch not in HF_ARCHS:
            raise ValueError(f"arch must be one of {list(HF_ARCHS)}; got {self.arch!r}")
        for name in ("vocab_size", "max_len", "dim", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        kv = self.kv_heads or self.heads
        if self.dim % self.heads or self.heads % kv:
            raise ValueError(
                f"dim={self.dim} must be a multiple of heads={self.heads}, and heads a multiple "
                f"of kv_heads={self.kv_heads}"
            )
        if self.arch == "gpt2" and kv != self.heads:
            raise ValueError(f"arch=gpt2 has no grouped-query attention; got kv_heads={kv}")
        if self.sliding_window and self.arch not in SLIDING_ARCHS:
            raise ValueError(
                f"sliding_window={self.sliding_window}: arch={self.arch} has no sliding window "
                f"(only {list(SLIDING_ARCHS)})"
            )


def implementation(attn: str, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """The transformers ``attn_implementation`` of attention path `attn` (theria's paths are
    registered with theria.hf on first use)."""
    if attn in _THERIA:
        import theria.hf

        if attn == "theria" and block_size == DEFAULT_BLOCK_SIZE:
            return theria.hf.NAME
        return theria.hf.register(
            f"theria_{_THERIA[attn]}_b{block_size}", _THERIA[attn], block_size
        )
    return "sdpa" if attn == "sdpa_math" else attn


def _from_config(c: HFModelConfig):
    import transformers

    kv = c.kv_heads or c.heads
    hidden = int(c.dim * c.mlp_ratio)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=hidden,
                  num_hidden_layers=c.depth, num_attention_heads=c.heads,
                  num_key_value_heads=kv, max_position_embeddings=c.max_len,
                  attention_dropout=0.0, tie_word_embeddings=False)  # fmt: skip
    if c.arch == "llama":
        config = transformers.LlamaConfig(**common)
    elif c.arch == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=c.sliding_window or None)
    elif c.arch == "qwen2":
        window = dict(use_sliding_window=True, sliding_window=c.sliding_window,
                      max_window_layers=0) if c.sliding_window else {}  # fmt: skip
        config = transformers.Qwen2Config(**common, **window)
    else:
        config = transformers.GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_len, n_embd=c.dim, n_layer=c.depth,
            n_head=c.heads, n_inner=hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
    impl = implementation(c.attn, c.block_size)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl)


def _is_causal(model) -> bool:
    """Whether logits at a position ignore later tokens (checked on two 3-token inputs)."""
    a = torch.zeros(1, 3, dtype=torch.long)
    b = a.clone()
    b[0, -1] = 1
    with torch.no_grad():
        la, lb = (model(input_ids=x, use_cache=False).logits[:, :-1] for x in (a, b))
    return bool(torch.allclose(la, lb))


class HFCausalLM(nn.Module):
    """A transformers causal LM mapping tokens (B, L) int64 to logits (B, L, vocab_size).

    ``config`` is the `HFModelConfig` (``config.attn`` names the attention path in the
    algorithms' error messages); ``hf`` the transformers model. Not tested under
    ``torch.func.vmap`` over parameters (transformers' mask code branches on data), hence
    ``supports_task_vmap = False``: the algorithms run its tasks one after another.
    """

    supports_task_vmap = False

    def __init__(self, config: HFModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.path is None:
            self.hf = _from_config(config)
        else:
            import transformers

            self.hf = transformers.AutoModelForCausalLM.from_pretrained(
                config.path,
                attn_implementation=implementation(config.attn, config.block_size),
                local_files_only=True,
                dtype=torch.float32,
            )
            if self.hf.config.vocab_size < config.vocab_size:
                raise ValueError(
                    f"the pretrained model at {config.path} has {self.hf.config.vocab_size} "
                    f"tokens; the task needs vocab_size={config.vocab_size}"
                )
            self.hf.eval()
            if not _is_causal(self.hf):
                raise ValueError(
                    f"the model at {config.path} ({self.hf.config.model_type}) is not causal "
                    "(its first logits change with the last token); next-token tasks need a "
                    "decoder-only causal LM"
                )
        self.hf.eval()  # no dropout: deterministic passes
        self._context = (
            (lambda: torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH))
            if config.attn == "sdpa_math"
            else contextlib.nullcontext
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) int64 -> logits (B, L, vocab_size); any leading dims are folded."""
        lead = tokens.shape[:-1]
        with self._context():
            logits = self.hf(input_ids=tokens.reshape(-1, tokens.shape[-1]), use_cache=False)
        out = logits.logits[..., : self.config.vocab_size]  # (B, L, V_model) -> (B, L, V)
        return out.reshape(*lead, *out.shape[-2:])
