"""Small attention problems shared by the operator tests.

Each case builds (q, k, v, kwargs) for `theria.sdpa`. Sizes are tiny and odd on purpose (so that
float64 gradcheck stays fast) and `BLOCK` is smaller than S, so every case crosses key blocks and
most end with a partial block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

BLOCK = 3


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[torch.dtype], tuple[Tensor, Tensor, Tensor, dict[str, Any]]]

    def __str__(self) -> str:
        return self.name


def _qkv(
    dtype: torch.dtype,
    bq: tuple[int, ...],
    L: int,
    S: int,
    E: int = 3,
    Ev: int = 2,
    bk: tuple[int, ...] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    bk = bq if bk is None else bk
    return (
        torch.randn(*bq, L, E, dtype=dtype),
        torch.randn(*bk, S, E, dtype=dtype),
        torch.randn(*bk, S, Ev, dtype=dtype),
    )


def _plain(dtype):
    return (*_qkv(dtype, (2,), 4, 7), {})


def _causal_l_lt_s(dtype):
    return (*_qkv(dtype, (1, 2), 4, 7), {"is_causal": True})


def _causal_l_gt_s(dtype):
    # L > S: with PyTorch's top-left alignment every row still sees key 0.
    return (*_qkv(dtype, (2,), 6, 4), {"is_causal": True})


def _bool_mask_with_dead_row(dtype):
    q, k, v = _qkv(dtype, (2,), 5, 7)
    mask = torch.rand(5, 7) > 0.4
    mask[1] = False  # a row with no key at all: defined as zero output, zero gradient
    mask[3, 0] = True
    return q, k, v, {"attn_mask": mask}


def _float_mask_broadcast(dtype):
    q, k, v = _qkv(dtype, (2, 2), 4, 5)
    mask = torch.randn(2, 1, 4, 5, dtype=dtype)  # broadcast over heads
    mask[0, 0, 2, 1:] = float("-inf")
    return q, k, v, {"attn_mask": mask}


def _gqa(dtype):
    q, k, v = _qkv(dtype, (1, 4), 3, 5, bk=(1, 2))
    return q, k, v, {"enable_gqa": True, "is_causal": True}


def _gqa_mask(dtype):
    q, k, v = _qkv(dtype, (1, 4), 3, 5, bk=(1, 2))
    return q, k, v, {"enable_gqa": True, "attn_mask": torch.rand(4, 1, 5) > 0.3}


def _scale_and_single_key(dtype):
    return (*_qkv(dtype, (2,), 3, 1), {"scale": 0.37})


def _single_query(dtype):
    return (*_qkv(dtype, (2,), 1, 5), {"scale": 1.9})


def _broadcast_batch(dtype):
    # query has a batch dim of 2, key/value broadcast from 1 (an expanded-style input).
    return (*_qkv(dtype, (2, 1), 3, 4, bk=(1, 2)), {})


CASES = [
    Case("plain", _plain),
    Case("causal_L<S", _causal_l_lt_s),
    Case("causal_L>S", _causal_l_gt_s),
    Case("bool_mask_dead_row", _bool_mask_with_dead_row),
    Case("float_mask_broadcast", _float_mask_broadcast),
    Case("gqa_causal", _gqa),
    Case("gqa_mask", _gqa_mask),
    Case("scale_S=1", _scale_and_single_key),
    Case("L=1", _single_query),
    Case("broadcast_batch", _broadcast_batch),
]
