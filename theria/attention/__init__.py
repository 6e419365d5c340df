"""theria's attention operator: `sdpa` and its backends (see docs/CONTRACT.md, docs/MATH.md)."""

from theria.attention.api import BACKENDS, DEFAULT_BLOCK_SIZE, sdpa

__all__ = ["BACKENDS", "DEFAULT_BLOCK_SIZE", "sdpa"]
