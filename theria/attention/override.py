"""`override_sdpa`: run every `torch.nn.functional.scaled_dot_product_attention` call inside a
block through `theria.sdpa`, so code that calls PyTorch's SDPA (timm, nanoGPT-style models,
Hugging Face models with ``attn_implementation="sdpa"``, ``nn.MultiheadAttention``) gets
theria's exact, memory-efficient first and second derivatives without being edited.

    with theria.override_sdpa():                 # or @theria.override_sdpa() on a function
        loss = model(x).sum()
        g = torch.autograd.grad(loss, params, create_graph=True)   # double backward works

What the block changes, and puts back on exit (also when the block raises; nested blocks
restore in order):

- the attribute ``torch.nn.functional.scaled_dot_product_attention``. Every caller that looks
  it up at call time (``F.scaled_dot_product_attention(...)``, ``torch.nn.functional...``, and
  ``F.multi_head_attention_forward`` itself) reaches theria. A module that bound the function
  at its own import (``from torch.nn.functional import scaled_dot_product_attention``) or calls
  ``torch._C._nn.scaled_dot_product_attention`` keeps PyTorch's: it bypasses the override.
- PyTorch's fused fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerEncoder`` (``torch._native_multi_head_attention``,
  ``torch._transformer_encoder_layer_fwd``, taken in eval mode when no input needs a gradient:
  e.g. under forward-mode AD) is switched off with ``torch.backends.mha.set_fastpath_enabled``,
  so those modules take their SDPA path and reach theria.
- ``nn.MultiheadAttention`` called with ``need_weights=True`` (its default) computes the
  attention weights explicitly (bmm + softmax, O(L·S) memory) and never calls SDPA: inside the
  block such a call warns once (`theria._warnings.warn_once`) that it bypasses theria; pass
  ``need_weights=False`` (as ``nn.TransformerEncoderLayer`` does) to route it through theria.

The patch is process-wide (every thread sees it while the block runs).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from theria._warnings import warn_once
from theria.attention.api import DEFAULT_BLOCK_SIZE, Backend, sdpa

__all__ = ["override_sdpa"]


class override_sdpa(contextlib.ContextDecorator):
    """Context manager and decorator: inside, ``F.scaled_dot_product_attention(q, k, v,
    attn_mask, dropout_p, is_causal, scale, enable_gqa)`` runs ``theria.sdpa`` with the same
    arguments (shapes: query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev)),
    and ``nn.MultiheadAttention``'s fused fast path is off (see the module docstring for what
    bypasses it). Nothing stays changed after the block, also when it raises.

    Args:
        backend: the ``theria.sdpa`` backend for the calls inside (default ``"auto"``).
        block_size: keys per block for the ``torch`` backend.
    """

    def __init__(self, backend: Backend = "auto", block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        from theria.attention.api import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"override_sdpa: backend must be one of {BACKENDS}; got {backend!r}")
        if not (isinstance(block_size, int) and block_size > 0):
            raise ValueError(
                f"override_sdpa: block_size must be a positive int; got {block_size!r}"
            )
        self.backend = backend
        self.block_size = block_size
        self._saved: list[tuple[Any, Any, bool]] = []  # a stack: re-entry and recursion nest

    def _sdpa(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        return sdpa(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            backend=self.backend,
            block_size=self.block_size,
        )

    def __enter__(self) -> override_sdpa:
        original_mha = F.multi_head_attention_forward
        signature = inspect.signature(original_mha)
        self._saved.append(
            (
                F.scaled_dot_product_attention,
                original_mha,
                torch.backends.mha.get_fastpath_enabled(),
            )
        )

        @functools.wraps(original_mha)
        def multi_head_attention_forward(*args: Any, **kwargs: Any):
            bound = signature.bind_partial(*args, **kwargs).arguments
            if bound.get("need_weights", True):
                warn_once(
                    "override_sdpa:need_weights",
                    "override_sdpa: nn.MultiheadAttention with need_weights=True computes the "
                    "attention weights explicitly (bmm + softmax, O(L·S) memory) and does not "
                    "call scaled_dot_product_attention, so theria is bypassed for it; pass "
                    "need_weights=False to route it through theria.sdpa.",
                )
            return original_mha(*args, **kwargs)

        F.scaled_dot_product_attention = self._sdpa
        F.multi_head_attention_forward = multi_head_attention_forward
        torch.backends.mha.set_fastpath_enabled(False)
        return self

    def __exit__(self, *exc: object) -> None:
        sdpa_fn, mha_fn, fastpath = self._saved.pop()
        F.scaled_dot_product_attention = sdpa_fn
        F.multi_head_attention_forward = mha_fn
        torch.backends.mha.set_fastpath_enabled(fastpath)
