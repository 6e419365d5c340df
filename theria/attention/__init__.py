"""theria's attention operator: `sdpa` and its backends (see docs/CONTRACT.md, docs/MATH.md);
`override_sdpa` routes PyTorch's SDPA calls through it."""

from theria.attention.api import BACKENDS, DEFAULT_BLOCK_SIZE, sdpa
from theria.attention.override import override_sdpa

__all__ = ["BACKENDS", "DEFAULT_BLOCK_SIZE", "override_sdpa", "sdpa"]
