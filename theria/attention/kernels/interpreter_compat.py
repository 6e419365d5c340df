"""A fix for the Triton interpreter (TRITON_INTERPRET=1) of Triton < 3.7 under NumPy ≥ 2.

That interpreter turns a scalar tensor into a Python int (a loop bound: `range(0, hi, BLOCK)`)
with `int(data)`, where `data` is a one-element 1-d array; NumPy 2 refuses that ("only
0-dimensional arrays can be converted to Python scalars"), so every kernel with such a loop
fails there (seen with Triton 3.6, the H200 image's). Later interpreters squeeze the array
first; `apply()` makes earlier ones do the same. Nothing changes outside the interpreter.
"""

from __future__ import annotations

import os

_applied = False


def apply() -> None:
    """Patch the interpreter's scalar conversion once (idempotent; a no-op unless
    TRITON_INTERPRET=1 and the interpreter module has the hook this patches)."""
    global _applied
    if _applied or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    _applied = True
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - an interpreter without that module
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # pragma: no cover
        return

    def patch_tensor(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor
