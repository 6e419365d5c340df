"""A lower-overhead launcher for theria's Triton kernels on CUDA.

`kernel[grid](*args, **consts)` goes through Triton's `Autotuner.run` → `Heuristics.run` →
`JITFunction.run`, each of which rebuilds dicts of every argument, binds and specializes them
all and looks the compiled kernel up. theria's kernels take 40-60 arguments (strides per
tensor), and on an H100 host that costs 100-200 µs per launch (profiled,
experiments/results/triton_first_order_h100.md): at N=4096 a forward + backward is ~1.3 ms of
GPU work, so four launches added ~40% to it.

`launch` keeps the result of Triton's own path (the `CompiledKernel` it returns) under a key of
everything Triton specializes a compilation on — per tensor its dtype and whether its address
is 16-byte aligned, per integer whether it is 1, divisible by 16 and which integer type it
needs, the constexpr values and the launch options — plus the current device, and on a hit
calls the compiled kernel's launcher directly, with the same arguments, metadata and hooks that
`JITFunction.run` passes it. The key is at least as fine as Triton's, so a cached kernel is only
reused where Triton would have chosen the same one. The first launch of each key (and any launch
under the interpreter, with a global launch hook or in a Triton whose `CompiledKernel` lacks
the attributes used here) goes through Triton's path unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import triton

try:  # where Triton keeps the allocator of a launch's global scratch (Triton >= 3.2)
    from triton.runtime import _allocation
except ImportError:  # pragma: no cover
    _allocation = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DISABLED = os.environ.get("THERIA_FAST_LAUNCH", "1") == "0"

try:  # Triton >= 3.4 keeps the launch hooks in knobs
    from triton import knobs as _knobs

    def _hooks() -> tuple[Any, Any]:
        return _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
except ImportError:  # pragma: no cover - older Triton: class attributes of CompiledKernel
    from triton.compiler import CompiledKernel as _CK

    def _hooks() -> tuple[Any, Any]:
        return getattr(_CK, "launch_enter_hook", None), getattr(_CK, "launch_exit_hook", None)


def _base(kernel: Any) -> Any:
    """The JITFunction under Autotuner / Heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn
    return kernel


class _Signature:
    """A kernel's parameters in order, which of them are constexprs, and their defaults."""

    def __init__(self, fn: Any) -> None:
        params = inspect.signature(fn.fn).parameters
        constexprs = {p.name for p in fn.params if _flag(p.is_constexpr)}
        self.order = [(name, name in constexprs) for name in params]
        self.runtime_pos = [i for i, (_, const) in enumerate(self.order) if not const]
        self.defaults = {
            n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty
        }

    def values(self, args: Sequence[Any], consts: dict[str, Any]) -> list[Any]:
        """Every parameter's value in declaration order (what Triton's launcher takes)."""
        it = iter(args)
        return [
            (consts[n] if n in consts else self.defaults[n]) if const else next(it)
            for n, const in self.order
        ]


def _flag(x: Any) -> bool:
    """A KernelParam attribute that is a cached property in some Triton versions, a method in
    others."""
    return bool(x() if callable(x) else x)


_SIGS: dict[int, _Signature] = {}
_COMPILED: dict[tuple, Any] = {}
_I32 = 1 << 31
_U64 = 1 << 63


def layout_key(t: torch.Tensor | None) -> tuple | None:
    """Shape, strides, dtype and 16-byte alignment of a tensor: two tensors with equal keys can
    take each other's place in a `Prepared` launch."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def _arg_key(a: Any) -> Any:
    """What Triton specializes a compilation on for one runtime argument (or finer)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return ("b", a)
    if isinstance(a, int):
        width = 0 if -_I32 <= a < _I32 else 1 if a < _U64 else 2  # i32, i64, u64
        return (a == 1, a % 16 == 0, width)
    if isinstance(a, float):
        return "f"
    return (type(a), a)


# Whether theria can scope an allocator to its launches (both names are Triton internals; without
# them the kernels that need scratch, the TMA path's, are not used: triton_impl._tma_device).
SCRATCH = all(hasattr(_allocation, n) for n in ("_allocator", "_NULL_ALLOCATOR"))
_NO_SCRATCH = contextlib.nullcontext()  # reusable: the context of a launch that needs none


def _torch_scratch(size: int, alignment: int, stream: Any) -> torch.Tensor:
    """A launch's global scratch from PyTorch's caching allocator (on the current stream, which
    is the launch's, so reuse after the kernel is ordered on it; 512-byte aligned)."""
    return torch.empty(size, dtype=torch.uint8, device=torch.cuda.current_device())


@contextlib.contextmanager
def scratch_allocator() -> Iterator[None]:
    """Within: kernels that need global scratch (the tensor descriptors of the TMA path, made on
    the device) get it from PyTorch. Triton otherwise refuses to launch them unless the program
    called `triton.set_allocator`; an allocator the program set is left in place. Scoped to
    this context, so nothing outside theria's launches changes."""
    var = _allocation._allocator if SCRATCH else None
    if var is None or var.get() is not _allocation._NULL_ALLOCATOR:
        yield
        return
    token = var.set(_torch_scratch)
    try:
        yield
    finally:
        var.reset(token)


def enabled() -> bool:
    """Whether launches are prepared and reused: on CUDA, THERIA_FAST_LAUNCH not 0, and not
    while torch.compile traces (it captures `kernel[grid](...)` calls of user Triton kernels
    itself, and its fake tensors have no data pointers)."""
    return not (INTERPRET or _DISABLED or torch.compiler.is_compiling())


class Prepared:
    """A compiled kernel with its grid and every parameter value of one launch: `run` launches
    it again with some runtime arguments replaced by tensors of the same dtype, shape, strides
    and 16-byte alignment (the caller's cache key guarantees that), skipping all dispatch."""

    __slots__ = ("compiled", "grid", "pos", "scratch", "stripped", "values")

    def __init__(
        self,
        compiled: Any,
        grid: tuple[int, int, int],
        values: list,
        pos: list[int],
        stripped: tuple[int, ...] = (),
    ) -> None:
        self.compiled, self.grid, self.values, self.pos = compiled, grid, values, pos
        self.stripped = stripped
        meta = getattr(compiled, "metadata", None)
        self.scratch = bool(getattr(meta, "global_scratch_size", 0))  # the TMA path's kernels

    def without(self, indices: Sequence[int]) -> Prepared:
        """Drop the values of runtime arguments `indices` (those every `run` replaces), so that a
        stored launch does not keep the tensors of the call that made it alive."""
        values = list(self.values)
        for i in indices:
            values[self.pos[i]] = None
        return Prepared(self.compiled, self.grid, values, self.pos, tuple(indices))

    def run(self, replace: Sequence[tuple[int, Any]]) -> None:
        """Launch with runtime argument i (its index in the `args` given to `launch`) set to
        each (i, value) of `replace`."""
        values = list(self.values)
        for i, x in replace:
            values[self.pos[i]] = x
        missing = [i for i in self.stripped if values[self.pos[i]] is None]
        if missing:  # a pointer the caller forgot: refuse rather than launch on address 0
            raise RuntimeError(f"theria: prepared launch run without arguments {missing}")
        c, g = self.compiled, self.grid
        stream = _stream(torch.cuda.current_device())
        enter, leave = _hooks()
        # Triton builds launch metadata only for an enter hook (None without one)
        meta = c.launch_metadata(g, stream, *values) if enter is not None else None
        with scratch_allocator() if self.scratch else _NO_SCRATCH:
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, meta, enter, leave,
                  *values)  # fmt: skip


def launch(
    kernel: Any, grid: Sequence[int], args: Sequence[Any], consts: dict[str, Any]
) -> Prepared | None:
    """`kernel[grid](*args, **consts)` for a JITFunction (or a heuristics-free wrapper of one):
    `args` are the runtime arguments in order, `consts` every constexpr the kernel has no default
    for plus num_warps / num_stages. Returns the launch as a `Prepared` (None under the
    interpreter or with THERIA_FAST_LAUNCH=0)."""
    if not enabled():
        with scratch_allocator():
            kernel[tuple(grid)](*args, **consts)
        return None
    fn = _base(kernel)
    device = torch.cuda.current_device()
    key = (id(fn), device, tuple(map(_arg_key, args)), tuple(sorted(consts.items())))
    compiled = _COMPILED.get(key)
    sig = _SIGS.get(id(fn))
    if sig is None:
        sig = _SIGS[id(fn)] = _Signature(fn)
    values = sig.values(args, consts)
    g = (*grid, 1, 1)[:3]
    if compiled is None:  # Triton's own path: compiles (or finds) and launches
        with scratch_allocator():
            compiled = fn[tuple(grid)](*args, **consts)
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        _COMPILED[key] = compiled
        return Prepared(compiled, g, values, sig.runtime_pos)
    prep = Prepared(compiled, g, values, sig.runtime_pos)
    prep.run(())
    return prep


def _stream(device: int) -> int:
    """The current CUDA stream's handle (what Triton's driver asks torch for)."""
    return torch._C._cuda_getCurrentRawStream(device)
