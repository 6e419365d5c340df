"""`theria.sdpa`: the public operator, a drop-in for F.scaled_dot_product_attention."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from theria._warnings import warn_once
from theria.attention import blockwise
from theria.attention.contract import _broadcast, canonicalize
from theria.attention.function import attention
from theria.attention.kernels import (
    MAX_GRID_BATCH,
    MAX_HEAD_DIM,
    TF32X3_MAX_HEAD,
    padded_head,
    precision,
)
from theria.attention.reference import reference_attention

Backend = Literal["auto", "reference", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton")
DEFAULT_BLOCK_SIZE = 256


@functools.cache  # kept once imported (a failed import raises again on the next call)
def _triton_impl():  # imported lazily: Triton is an optional, heavy import
    try:
        from theria.attention import triton_impl
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(f"theria.sdpa: backend='triton' needs Triton: {e}") from e
    return triton_impl


def _triton_usable(q: Tensor) -> bool:
    if not q.is_cuda:
        return False
    try:
        _triton_impl()
    except RuntimeError:
        return False
    return True


def auto_backend(
    dtype: torch.dtype, head_dim: int, batch: int, triton_ok: Callable[[], bool]
) -> str:
    """The backend ``"auto"`` picks for inputs of `dtype` whose widest head dim (E or Ev) is
    `head_dim` and whose flattened batch has `batch` entries; `triton_ok()` (called only when
    the rule would pick the kernels) says the inputs are on CUDA and Triton imports.

    - float16 / bfloat16: ``triton``.
    - float32 with heads up to 128 wide: ``triton``. Heads up to 64 (padded) get tf32x3 dots,
      which make a MAML or iMAML meta-step 3.5-4.8x faster than the torch backend at
      L >= 4096 on an H100 (experiments/results/meta_step_cuda_fp32.md); heads of 65-128
      bf16x6 dots, with which a forward + backward takes 0.55-0.83x the torch backend's time
      on an H200 (experiments/results/fp32_wide_heads_h200.md; their second-order step runs
      the torch backend's blockwise code, which is faster there). Both keep float32 within the
      2x-of-PyTorch error rule. Where THERIA_FP32_WIDE_DOTS=ieee was set (IEEE dots on the
      FMA units, 20-45x slower than the torch backend) wide float32 heads get ``torch``.
    - float64, heads wider than the kernels take, batches beyond the kernels' grid, and
      everything off CUDA: ``torch``.
    """
    padded = padded_head(head_dim)
    if dtype in (torch.float16, torch.bfloat16):
        fits = padded <= MAX_HEAD_DIM
    else:
        fits = (
            dtype == torch.float32
            and padded <= MAX_HEAD_DIM
            and precision(dtype, padded) != "ieee"  # IEEE float32 dots: slower than torch
        )
    return "triton" if fits and batch <= MAX_GRID_BATCH and triton_ok() else "torch"


def _slow_triton(dtype: torch.dtype, head_dim: int, is_cuda: bool) -> str | None:
    """The warning for an explicit backend='triton' call that runs the kernels where they are
    slow (float32 heads of 65-128 on CUDA: IEEE dots), else None."""
    padded = padded_head(head_dim)
    if not is_cuda or dtype != torch.float32 or not TF32X3_MAX_HEAD < padded <= MAX_HEAD_DIM:
        return None
    if precision(dtype, padded) != "ieee":  # THERIA_FP32_WIDE_DOTS chose another scheme
        return None
    return (
        f"theria.sdpa(backend='triton'): float32 with head dim {head_dim} (> 64) runs IEEE "
        "float32 dots on the FMA units: 20-45x slower than backend='torch' for an HVP on an "
        "H100 (experiments/results/triton_hvp_h100_d128.md). backend='auto' picks 'torch' for "
        "such inputs."
    )


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: Backend = "auto",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """Scaled dot-product attention with exact first and second derivatives in every mode.

    Same semantics as ``torch.nn.functional.scaled_dot_product_attention``::

        out = softmax(query @ key.mT * scale + mask) @ value

    Args:
        query: (..., L, E). With ``enable_gqa``: (..., Hq, L, E).
        key: (..., S, E); batch dims broadcast against query's. With GQA: (..., Hkv, S, E),
            Hq a multiple of Hkv.
        value: (..., S, Ev), same batch dims as key.
        attn_mask: None, or broadcastable to (..., L, S): bool (True = attend) or a float
            tensor of query's dtype added to the scores. Rows whose every key is masked give
            zeros (and zero gradients), not NaN.
        dropout_p: dropout on the attention weights. Only ``backend="reference"`` supports it
            (its mask is kept in the autograd graph, so every derivative pass sees the same
            mask); ``"auto"`` falls back to it with a warning, ``"torch"``/``"triton"`` raise.
        is_causal: causal mask aligned to the top-left corner, as PyTorch aligns it
            (query i attends keys j <= i). Not together with ``attn_mask``.
        scale: defaults to 1/sqrt(E).
        enable_gqa: grouped-query attention (keys/values broadcast over query-head groups,
            never copied).
        backend: ``"reference"`` (explicit composition, any order, O(L·S) memory),
            ``"torch"`` (blockwise autograd Functions, O(L·block) extra memory, exact first
            and second derivatives in every mode), ``"triton"`` (the same as Triton kernels;
            CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"auto"`` (``triton`` for float16 /
            bfloat16 CUDA tensors, and float32 ones with heads up to 128 wide, when Triton
            imports; else ``torch``; see `auto_backend`).
        block_size: keys per block for the ``torch`` backend.

    Returns:
        (..., L, Ev); with GQA (..., Hq, L, Ev).
    """
    if backend not in BACKENDS:
        raise ValueError(f"theria.sdpa: backend must be one of {BACKENDS}; got {backend!r}")
    c = canonicalize(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, block_size
    )
    chosen = backend
    head = max(c.q.shape[-1], c.v.shape[-1])  # the widest head dim, E or Ev
    if backend == "auto":
        batch = math.prod(_broadcast(tuple(c.q.shape[:-2]), tuple(c.k.shape[:-2])) or ())
        chosen = auto_backend(
            query.dtype, head, batch, lambda: query.is_cuda and _triton_usable(query)
        )
    if chosen != "reference":
        reason = None
        if c.problem.dropout_p > 0.0:
            reason = f"dropout_p={c.problem.dropout_p} > 0"
        elif attn_mask is not None and attn_mask.requires_grad and torch.is_grad_enabled():
            reason = "a float attn_mask that requires grad"
        elif attn_mask is not None and _has_forward_tangent(attn_mask):
            reason = "a float attn_mask with a forward-mode tangent"
        if reason is not None:
            if backend != "auto":
                raise NotImplementedError(
                    f"theria.sdpa: backend={backend!r} does not support {reason}; "
                    "use backend='reference' (O(L·S) memory) or backend='auto' to fall back"
                )
            warn_once(
                f"fallback:{reason.split('=')[0]}",
                f"theria.sdpa: {reason} is supported by backend='reference' only; falling back "
                "to it for such calls (O(L·S) memory).",
            )
            chosen = "reference"
    if chosen == "reference":
        out = reference_attention(c.q, c.k, c.v, c.mask, c.problem)
    elif chosen == "torch":
        out = attention(c.q, c.k, c.v, c.mask, c.problem, blockwise)
    else:
        _check_triton_device(query)
        if backend == "triton":  # auto never picks the slow case
            slow = _slow_triton(query.dtype, head, query.is_cuda)
            if slow is not None:
                warn_once("triton-fp32-wide-head", slow)
        # Triton launches on the current device; backward passes run on autograd's per-device
        # threads, which set it themselves
        other_gpu = query.is_cuda and query.device.index != torch.cuda.current_device()
        with torch.cuda.device(query.device) if other_gpu else contextlib.nullcontext():
            out = attention(c.q, c.k, c.v, c.mask, c.problem, _triton_impl())
    return c.restore(out)


def _check_triton_device(query: Tensor) -> None:
    """backend='triton' runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 in
    float32/float64: the interpreter's tl.dot is wrong in 16-bit (bfloat16 results off by
    ~1e9, triton-lang/triton#11584), so 16-bit inputs are refused there rather than returned
    wrong. Meta tensors (and any other device) have no kernel."""
    if query.is_cuda:
        return
    if query.device.type != "cpu" or not _interpreting():
        raise ValueError(
            "theria.sdpa: backend='triton' needs CUDA tensors (or CPU tensors with "
            f"TRITON_INTERPRET=1 to run the kernels in Triton's interpreter); got query of "
            f"shape {tuple(query.shape)}, dtype {query.dtype} on {query.device}. "
            "backend='torch' or 'auto' takes any device (meta tensors included)"
        )
    if query.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"theria.sdpa: backend='triton' under TRITON_INTERPRET=1 takes float32 or float64; "
            f"got {query.dtype} (the interpreter's 16-bit tl.dot returns wrong values, "
            "triton-lang/triton#11584). Use float32 there, or backend='torch' for 16-bit on the "
            "CPU (it computes in float32)"
        )


def _has_forward_tangent(t: Tensor) -> bool:
    """A dual tensor of torch.autograd.forward_ad (torch.func's tangents are refused later, in
    the Functions' jvp, since they are invisible here)."""
    if t.is_floating_point():
        from torch.autograd import forward_ad

        try:
            return forward_ad.unpack_dual(t).tangent is not None
        except RuntimeError:  # no dual level is active
            return False
    return False


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
