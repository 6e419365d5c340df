"""One intra-op thread for these tiny-op tests (see tests/algos/conftest.py)."""

from tests.algos.conftest import _one_thread

__all__ = ["_one_thread"]
