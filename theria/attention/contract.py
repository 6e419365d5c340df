"""Input checking and the canonical form every backend computes on.

`canonicalize` turns the arguments of `theria.sdpa` (the signature of
`torch.nn.functional.scaled_dot_product_attention`) into

    q (*B, L, E), k (*B', S, E), v (*B', S, Ev), mask None | (..., L, S) bool/float

where *B and *B' broadcast against each other. Grouped-query attention (`enable_gqa=True`,
Hq = G·Hkv) becomes broadcasting: q is viewed as (..., Hkv, G, L, E) and k, v as
(..., Hkv, 1, S, E), so no key or value is ever copied. `Canonical.restore` maps the output
back to (..., Hq, L, Ev). The rules are written down in docs/CONTRACT.md.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """Everything about one attention call that is not a tensor."""

    scale: float
    is_causal: bool
    dropout_p: float = 0.0
    block_size: int = 256


@dataclass
class Canonical:
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    problem: Problem
    restore: Callable[[Tensor], Tensor]


def _shape(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _flag(name: str, value: object) -> bool:
    """A bool argument. Anything else (a string such as "False" is truthy) is refused, as
    PyTorch's argument parser refuses it."""
    if not isinstance(value, bool):
        raise TypeError(
            f"theria.sdpa: {name} must be a bool (True or False); got {value!r} "
            f"of type {type(value).__name__}"
        )
    return value


def _number(name: str, value: object, expected: str) -> float:
    """A real number given as a Python or numpy scalar or a 0-d tensor (PyTorch takes all
    three), as a float. Not a bool, a string, a complex number or a tensor with elements or a
    graph (its gradient would be lost: the argument is a constant of the operator)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(
                f"theria.sdpa: {name} must be {expected}; got a tensor of {_shape(value)} "
                "(only a 0-d real tensor is taken, as PyTorch takes it)"
            )
        if value.requires_grad:
            raise TypeError(
                f"theria.sdpa: {name} must be {expected}; got a 0-d tensor that requires grad "
                "(the operator takes it as a constant, so its gradient would be lost; pass "
                "float(t), or fold a learned scale into query)"
            )
        if value.is_meta:
            raise TypeError(f"theria.sdpa: {name} must be {expected}; got a meta tensor (no value)")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"theria.sdpa: {name} must be {expected}; got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def mask_scores(s: Tensor, mask: Tensor | None, j0: int, problem: Problem) -> Tensor:
    """Apply the attention mask and the causal rule to a block of scores.

    s: (*B, L, b) scores for key columns [j0, j0 + b). Masked entries become -inf.
    """
    b = s.shape[-1]
    if problem.is_causal:
        L = s.shape[-2]
        rows = torch.arange(L, device=s.device).unsqueeze(-1)  # (L, 1)
        cols = torch.arange(j0, j0 + b, device=s.device)  # (b,)
        # PyTorch aligns the causal mask to the top-left corner: ones(L, S).tril(0).
        s = s.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        m = mask if (j0 == 0 and b == mask.shape[-1]) else mask[..., j0 : j0 + b]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    return s


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """The broadcast of two shapes, or None if they do not broadcast. Plain Python: this runs
    on every call, and torch.broadcast_shapes costs ~100 µs there."""
    if a == b:  # the common case (self-attention heads, one batch)
        return a
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _check_broadcast(
    name_a: str, a: tuple[int, ...], name_b: str, b: tuple[int, ...], gqa: bool
) -> None:
    # with GQA the heads dims were checked already; the rest must broadcast
    if (_broadcast(a[:-1], b[:-1]) if gqa else _broadcast(a, b)) is None:
        raise ValueError(
            f"theria.sdpa: the batch dimensions of {name_a} {a} and {name_b} {b} do not broadcast"
        )


def canonicalize(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    block_size: int,
) -> Canonical:
    """Check the arguments of `theria.sdpa` and bring them to the canonical form."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"theria.sdpa: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"theria.sdpa: {name} must have at least 2 dims (..., N, E); got {_shape(t)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"theria.sdpa: {name} must be a floating-point tensor; got {_shape(t)}")
        if t.layout != torch.strided or t.is_nested:
            raise TypeError(
                f"theria.sdpa: {name} must be a dense (strided) tensor; got layout {t.layout}"
                f"{' (nested)' if t.is_nested else ''}, {_shape(t)}"
            )
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(
                f"theria.sdpa: {name} dtype {t.dtype} differs from query dtype {query.dtype}; "
                "cast them to one dtype"
            )
        if t.device != query.device:
            raise ValueError(f"theria.sdpa: {name} is on {t.device} but query is on {query.device}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(
            "theria.sdpa: query and key must share the last (embedding) dim E: "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            "theria.sdpa: key and value must have the same sequence length S (dim -2): "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    if key.shape[:-2] != value.shape[:-2]:
        raise ValueError(
            "theria.sdpa: key and value must have the same batch dims: "
            f"key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    # the plain-Python types first: every call takes these checks
    if type(is_causal) is not bool:
        is_causal = _flag("is_causal", is_causal)
    if type(enable_gqa) is not bool:
        enable_gqa = _flag("enable_gqa", enable_gqa)
    if type(dropout_p) is not float:
        dropout_p = _number("dropout_p", dropout_p, "a number in [0, 1)")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"theria.sdpa: dropout_p must be in [0, 1); got {dropout_p}")
    if scale is not None:
        scale = _number("scale", scale, "a finite real number or None")
        if not math.isfinite(scale):
            raise ValueError(
                f"theria.sdpa: scale must be a finite real number or None; got {scale}"
            )
        # every backend scales in float32 (float64 for float64 inputs): beyond it, inf scores
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        if abs(scale) > torch.finfo(work).max:
            raise ValueError(
                f"theria.sdpa: scale={scale:g} overflows {work} (the scores are scaled in it for "
                f"{query.dtype} inputs); expected |scale| <= {torch.finfo(work).max:.3g}"
            )
    if type(block_size) is not int:
        if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
            raise TypeError(
                f"theria.sdpa: block_size must be a positive int; got {block_size!r} of type "
                f"{type(block_size).__name__}"
            )
        block_size = operator.index(block_size)
    if block_size < 1:
        raise ValueError(f"theria.sdpa: block_size must be a positive int; got {block_size}")
    if is_causal and attn_mask is not None:
        raise ValueError(
            "theria.sdpa: pass either attn_mask or is_causal=True, not both "
            "(as torch.nn.functional.scaled_dot_product_attention requires)"
        )

    L, E = query.shape[-2], query.shape[-1]
    S = key.shape[-2]
    if L == 0 or S == 0 or E == 0:
        raise ValueError(
            "theria.sdpa: empty attention: query and key need L >= 1, S >= 1 and E >= 1; got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    q, k, v = query, key, value
    restore: Callable[[Tensor], Tensor] = lambda out: out  # noqa: E731

    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3:
            raise ValueError(
                "theria.sdpa: enable_gqa=True needs a heads dim (-3) in query and key; got "
                f"query {tuple(query.shape)}, key {tuple(key.shape)}"
            )
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq % hkv != 0:
            raise ValueError(
                f"theria.sdpa: with enable_gqa=True the query heads ({hq}) must be a multiple "
                f"of the key/value heads ({hkv}); query {tuple(query.shape)}, "
                f"key {tuple(key.shape)}"
            )
        g = hq // hkv
        q = query.unflatten(-3, (hkv, g))  # (..., Hq, L, E) -> (..., Hkv, G, L, E)
        k = key.unsqueeze(-3)  # (..., Hkv, S, E) -> (..., Hkv, 1, S, E)
        v = value.unsqueeze(-3)

        def restore(out: Tensor) -> Tensor:
            return out.flatten(-4, -3)  # (..., Hkv, G, L, Ev) -> (..., Hq, L, Ev)

    if not enable_gqa and query.dim() >= 3 and key.dim() >= 3:
        hq, hkv = query.shape[-3], key.shape[-3]
        if hq != hkv and hkv != 1 and hq != 1:
            raise ValueError(
                f"theria.sdpa: query has {hq} heads and key {hkv}; pass enable_gqa=True for "
                "grouped-query attention"
            )
    _check_broadcast("query", tuple(query.shape[:-2]), "key", tuple(key.shape[:-2]), enable_gqa)
    batch = _broadcast(tuple(q.shape[:-2]), tuple(k.shape[:-2]))
    assert batch is not None  # checked above

    mask = attn_mask
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(
                f"theria.sdpa: attn_mask must be a Tensor or None, got {type(mask).__name__}"
            )
        if mask.layout != torch.strided or mask.is_nested:
            raise TypeError(
                f"theria.sdpa: attn_mask must be a dense (strided) tensor; got layout "
                f"{mask.layout}, {_shape(mask)}"
            )
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            raise TypeError(
                f"theria.sdpa: attn_mask must be bool (True = attend) or have the query's dtype "
                f"{query.dtype}; got {_shape(mask)}"
            )
        if mask.device != query.device:
            raise ValueError(
                f"theria.sdpa: attn_mask is on {mask.device} but query is on {query.device}"
            )
        full = (*batch, L, S) if not enable_gqa else (*query.shape[:-2], L, S)
        if _broadcast(tuple(mask.shape), full) != tuple(full):
            raise ValueError(
                f"theria.sdpa: attn_mask {tuple(mask.shape)} does not broadcast to the attention "
                f"shape {full} (batch..., L={L}, S={S})"
            )
        if enable_gqa:
            mask = mask.expand(full).unflatten(-3, (key.shape[-3], full[-3] // key.shape[-3]))
        else:
            # Keys are sliced in blocks, so the key dim must be real (a view, no copy).
            mask = mask.expand(*mask.shape[:-1], S)

    problem = _problem(scale if scale is not None else 1.0 / math.sqrt(E), is_causal, dropout_p,
                       block_size)  # fmt: skip
    return Canonical(q, k, v, mask, problem, restore)


@functools.lru_cache(maxsize=1024)
def _problem(scale: float, is_causal: bool, dropout_p: float, block_size: int) -> Problem:
    """One Problem per distinct value (a frozen dataclass: building one costs more than finding
    it, and launch-plan keys hash it on every call)."""
    return Problem(scale=scale, is_causal=is_causal, dropout_p=dropout_p, block_size=block_size)
