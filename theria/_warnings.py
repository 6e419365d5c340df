"""One-time warnings, the one home of `warn_once` for every layer (the operator, its kernels,
the algorithms, the trainer): a fallback or degradation is announced once per process, never
silently taken. Below every other theria module, so nothing imports back up for it."""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warns `message` the first time `key` is seen in this process (later calls are silent)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=3)


def forget(key: str | None = None) -> None:
    """Lets `key` (every key, when None) warn again: for tests."""
    if key is None:
        _warned.clear()
    else:
        _warned.discard(key)
