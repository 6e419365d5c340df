"""Hessian-vector products, JVPs and their finite-difference checks.

`fn` is a scalar function of `primals`, a tuple of tensors or a dict of tensors (a pytree of
one level, as a model's parameter dict); tangents have the same structure.

    hvp(fn, primals, tangents, mode="rev_rev")   reverse-over-reverse: grad of ⟨∇f, v⟩
    hvp(fn, primals, tangents, mode="fwd_rev")   forward-over-reverse: jvp of ∇f along v
    fd_hvp(fn, primals, tangents, eps)           central difference of ∇f along v
    check_hvp(fn, primals, u, v)                 relative errors between the three, symmetry
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd import forward_ad

from theria._engine import calling_thread, tangents_not_differentiated
from theria._warnings import warn_once

Tree = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
HvpMode = Literal["rev_rev", "fwd_rev"]


def _flatten(tree: Tree) -> tuple[list[Tensor], Callable[[Sequence[Tensor]], Any]]:
    if isinstance(tree, Tensor):
        return [tree], lambda xs: xs[0]
    if isinstance(tree, Mapping):
        keys = list(tree.keys())
        return [tree[key] for key in keys], lambda xs: dict(zip(keys, xs, strict=True))
    if isinstance(tree, Sequence):
        kind = type(tree)
        return list(tree), lambda xs: kind(xs) if kind in (tuple, list) else tuple(xs)
    raise TypeError(
        f"expected a Tensor, a sequence or a mapping of tensors; got {type(tree).__name__}"
    )


def _apply(fn: Callable[..., Any], primals: Tree) -> Any:
    return fn(primals) if isinstance(primals, (Tensor, Mapping)) else fn(*primals)


def _call(fn: Callable[..., Tensor], primals: Tree) -> Tensor:
    out = _apply(fn, primals)
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise ValueError(f"fn must return a scalar tensor; got {getattr(out, 'shape', type(out))}")
    return out.reshape(())


def _tangents_like(primals: Tree, tangents: Tree, name: str = "tangents") -> list[Tensor]:
    """The tangents flattened in the primals' order: dicts are matched by key, not position."""
    if isinstance(primals, Mapping):
        if not isinstance(tangents, Mapping) or set(tangents) != set(primals):
            got = sorted(tangents) if isinstance(tangents, Mapping) else type(tangents).__name__
            raise ValueError(f"{name}: expected a dict with keys {sorted(primals)}; got {got}")
        flat = [tangents[key] for key in primals]
    else:
        flat = _flatten(tangents)[0]
    _check_like(_flatten(primals)[0], flat, name)
    return flat


def _check_like(primals: list[Tensor], tangents: list[Tensor], name: str) -> None:
    if len(primals) != len(tangents):
        raise ValueError(f"{name}: {len(tangents)} tensors for {len(primals)} primals")
    for i, (p, t) in enumerate(zip(primals, tangents, strict=True)):
        if p.shape != t.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, its primal {tuple(p.shape)}")


@calling_thread
def grad(fn: Callable[..., Tensor], primals: Tree, create_graph: bool = False) -> Any:
    """∇f at primals, with the structure of primals. With `create_graph`, primals that already
    require grad are differentiated as they are, so the gradient stays connected to them."""
    flat, unflatten = _flatten(primals)
    leaves = [
        p if (create_graph and p.requires_grad) else p.detach().requires_grad_(True) for p in flat
    ]
    with torch.enable_grad():
        out = _call(fn, unflatten(leaves))
        gs = torch.autograd.grad(out, leaves, create_graph=create_graph, allow_unused=True)
    return unflatten(
        [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, gs, strict=True)]
    )


@functools.cache
def _load_jvp_decompositions() -> None:
    """Imports torch's forward-AD decompositions (what the first dual tensor would import)
    with its `torch.jit.script is deprecated` FutureWarning silenced: torch 2.14's own module
    scripts them at import, nothing theria or its user can change. Other warnings pass."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                category=FutureWarning)  # fmt: skip
        from torch._decomp import decompositions_for_jvp  # noqa: F401


@calling_thread
def hvp(fn: Callable[..., Tensor], primals: Tree, tangents: Tree, mode: HvpMode = "rev_rev") -> Any:
    """Hessian of the scalar `fn` at `primals` applied to `tangents` (same structure).

    mode "rev_rev": the gradient of ⟨∇f, v⟩ (∇f taken with create_graph=True). mode "fwd_rev":
    the tangent of ∇f along v: by autograd on dual tensors (`torch.autograd.forward_ad`), or by
    torch.func's jvp of grad under a torch.func transform (vmap) and, warned once, for good
    after an op that PyTorch's forward-mode AD has no formula for (SiLU's backward). Where
    PyTorch's forward-mode AD fails inside fn with "ZeroTensors are immutable" (F.mse_loss with
    reduction="mean", pytorch/pytorch#123996), the call and later calls of the same function
    run as rev_rev, warned once; under a torch.func transform, where that cannot run, it
    raises with the workaround.

    Host time in fwd_rev: an op of fn that mixes a tensor carrying a tangent with one that
    carries none (a Python number as in `0.5 * loss`, a target as in `pred - y`, a plain
    LayerNorm weight) costs PyTorch 0.1-0.4 ms of Python per op (its ZeroTensor arithmetic
    runs Python meta functions; torch 2.14, 2-core CPU host), against ~5 µs for the same op
    between two dual tensors; rev_rev does not pay it. The backward's seed is dual here, so
    the backward's own first steps do not pay it either (`_dual_seed`)."""
    flat, unflatten = _flatten(primals)
    tflat = _tangents_like(primals, tangents)
    if mode == "rev_rev":
        leaves = [p.detach().requires_grad_(True) for p in flat]
        with torch.enable_grad():
            out = _call(fn, unflatten(leaves))
            if not out.requires_grad:  # f does not depend on the primals: H = 0
                return unflatten([torch.zeros_like(p) for p in flat])
            gs = torch.autograd.grad(out, leaves, create_graph=True, allow_unused=True)
            # the gradient of ⟨∇f, v⟩ as a vector-Jacobian product of ∇f with cotangent v: the
            # same values as forming the dot, without its products and sums (and their backward)
            pairs = [
                (g, t) for g, t in zip(gs, tflat, strict=True) if g is not None and g.requires_grad
            ]
            if not pairs:  # ∇f is constant: H = 0
                return unflatten([torch.zeros_like(p) for p in flat])
            hv = torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                grad_outputs=[t.to(g.dtype) for g, t in pairs],
                allow_unused=True,
            )
        return unflatten(
            [torch.zeros_like(p) if h is None else h for p, h in zip(leaves, hv, strict=True)]
        )
    if mode == "fwd_rev":
        _load_jvp_decompositions()
        key = _fn_key(fn)
        transformed = torch._C._are_functorch_transforms_active()
        if transformed or key not in _ZERO_TENSOR_FNS:
            try:
                return unflatten(_fwd_rev(fn, unflatten, flat, tflat))
            except RuntimeError as e:
                if not str(e).startswith(_ZERO_TENSOR_MUTATED):
                    raise
                if transformed:  # torch.autograd cannot run here
                    raise RuntimeError(
                        "theria.autodiff.hvp(mode='fwd_rev'): PyTorch's forward-mode AD failed "
                        f"inside fn under torch.func ({str(e).splitlines()[0]!r}; "
                        f"{_ZERO_TENSOR_CASE})."
                    ) from e
                warn_once(
                    "autodiff:fwd_rev-zerotensor",
                    "theria.autodiff.hvp(mode='fwd_rev'): PyTorch's forward-mode AD failed "
                    f"inside fn ({str(e).splitlines()[0]!r}; {_ZERO_TENSOR_CASE}). This call and "
                    "later ones of the same function run mode='rev_rev' instead: the same "
                    "Hessian-vector product, by double backward.",
                )
                if key is not None:
                    _ZERO_TENSOR_FNS.add(key)
        # after the except block, so the failed attempt's graph is freed before the retry
        return hvp(fn, primals, tangents, mode="rev_rev")
    raise ValueError(f"hvp: mode must be 'rev_rev' or 'fwd_rev'; got {mode!r}")


def _fwd_rev(
    fn: Callable[..., Tensor], unflatten: Callable, flat: list[Tensor], tflat: list[Tensor]
) -> list[Tensor]:
    """Forward-over-reverse by the route that fits: torch.func under a torch.func transform
    (vmap, iMAML's batched step) or once dual tensors have met an op without a forward-mode
    formula; dual tensors otherwise (less host time per call)."""
    if torch._C._are_functorch_transforms_active() or not _DUAL_ROUTE["usable"]:
        return _fwd_rev_func(fn, unflatten, flat, tflat)
    try:
        return _fwd_rev_dual(fn, unflatten, flat, tflat)
    except NotImplementedError as e:
        if not str(e).startswith(_NO_FORWARD_FORMULA):
            raise
        _DUAL_ROUTE["usable"] = False
        warn_once(
            "autodiff:fwd_rev-dual",
            f"theria.autodiff.hvp(mode='fwd_rev'): {str(e).splitlines()[0]} Forward-over-"
            "reverse runs as torch.func's jvp of grad from now on in this process (torch.func "
            "decomposes such ops; it costs more host time per call).",
        )
        return _fwd_rev_func(fn, unflatten, flat, tflat)


# PyTorch's message for an op without a forward-mode AD formula (e.g. aten::silu_backward in
# torch 2.11-2.14, which a backward pass through SiLU runs on dual tensors; torch.func's jvp
# decomposes it instead).
_NO_FORWARD_FORMULA = "Trying to use forward AD with"
_DUAL_ROUTE = {"usable": True}  # False after such an op: the torch.func route from then on


# PyTorch's message when a forward-mode AD formula writes in place into the ZeroTensor that
# stands for an undefined tangent (a tensor that carries none, as a loss's target): for
# F.mse_loss with reduction="mean" on both forward-over-reverse routes, torch 2.14 here (and
# 2.15 nightlies by pytorch/pytorch#123996, open; a fix is proposed in #197723).
_ZERO_TENSOR_MUTATED = "ZeroTensors are immutable"
# Functions whose fwd_rev failed so (by their code: iMAML's closures, one per task, share it),
# run as rev_rev from then on without a second failed attempt each.
_ZERO_TENSOR_FNS: set[object] = set()


def _fn_key(fn: Callable[..., Any]) -> object:
    """What identifies fn across calls: its code object (shared by the closures of one def),
    else the callable itself; None when that cannot be hashed (then nothing is remembered)."""
    key = getattr(fn, "__code__", fn)
    try:
        hash(key)
    except TypeError:
        return None
    return key


_ZERO_TENSOR_CASE = (
    "a known case is F.mse_loss(..., reduction='mean'), pytorch/pytorch#123996; "
    "((pred - target) ** 2).mean() or reduction='sum' avoid it"
)


def _fwd_rev_func(
    fn: Callable[..., Tensor], unflatten: Callable, flat: list[Tensor], tflat: list[Tensor]
) -> list[Tensor]:
    """Forward-over-reverse with torch.func (composes with an enclosing vmap): the jvp of a
    vector-Jacobian product whose cotangent, the seed 1, is a primal of the jvp with a zero
    tangent, so that the backward's tensors carry tangents from its first step (as
    `_dual_seed` on the dual route; torch.func.grad's own seed carries none)."""
    primals = tuple(p.detach() for p in flat)
    seed = torch.ones((), dtype=primals[0].real.dtype, device=primals[0].device)

    def grad(seed: Tensor, *xs: Tensor) -> tuple[Tensor, ...]:
        out, vjp = torch.func.vjp(lambda *ys: _call(fn, unflatten(list(ys))), *xs)
        return vjp(seed.to(out.dtype))

    _, hv = torch.func.jvp(grad, (seed, *primals), (torch.zeros_like(seed), *tflat))
    return list(hv)


def _fwd_rev_dual(
    fn: Callable[..., Tensor], unflatten: Callable, flat: list[Tensor], tflat: list[Tensor]
) -> list[Tensor]:
    """Forward-over-reverse with dual tensors: ∇f by autograd on primals that carry the
    tangents, whose backward pass then carries the tangent of ∇f, H·v. The same derivative
    as torch.func's jvp of grad, with less host work per call: an autograd.Function's jvp runs
    from C++ here, where torch.func wraps each call in Python (one HVP through one small
    theria.sdpa call: 1.4-2.6 ms of CPU against 3.5-5.4 ms on a 2-core host). No reverse pass
    differentiates the tangents, so the attention's JVP step may run the kernels."""
    leaves = [p.detach().requires_grad_(True) for p in flat]
    with torch.enable_grad(), forward_ad.dual_level(), tangents_not_differentiated():
        duals = [forward_ad.make_dual(p, t) for p, t in zip(leaves, tflat, strict=True)]
        out = _call(fn, unflatten(duals))
        if not out.requires_grad:  # f does not depend on the primals: H = 0
            return [torch.zeros_like(p) for p in flat]
        gs = torch.autograd.grad(out, leaves, grad_outputs=_dual_seed(out), allow_unused=True)
        hv = [None if g is None else forward_ad.unpack_dual(g).tangent for g in gs]
    # no tangent: ∇f is constant along v (a linear part) or f does not use that primal
    return [torch.zeros_like(p) if h is None else h for p, h in zip(flat, hv, strict=True)]


def _dual_seed(out: Tensor) -> Tensor:
    """The backward's seed ∂f/∂f = 1 as a dual tensor with a zero tangent (`out` is the scalar
    f on dual tensors). autograd's default seed is a plain 1, so the backward's first steps
    (a loss's `grad * x`) each mix a plain with a dual tensor; PyTorch's forward-mode AD gives
    the plain side an undefined tangent, fills it with a ZeroTensor, and a ZeroTensor's
    arithmetic finds its result shape through a Python meta function (torch._refs): 0.1-0.25
    ms of host time per op on a 2-core CPU host (torch 2.14), against ~5 µs for the same op on
    two dual tensors. With a dual seed the backward's tensors are dual from its first step."""
    primal = forward_ad.unpack_dual(out).primal
    return forward_ad.make_dual(torch.ones_like(primal), torch.zeros_like(primal))


def jvp(fn: Callable[..., Tensor], primals: Tree, tangents: Tree) -> tuple[Tensor, Tensor]:
    """(f(primals), directional derivative of f along tangents), by forward-mode AD."""
    flat, unflatten = _flatten(primals)
    tflat = _tangents_like(primals, tangents)
    _load_jvp_decompositions()
    return torch.func.jvp(lambda *xs: _apply(fn, unflatten(list(xs))), tuple(flat), tuple(tflat))


def fd_hvp(fn: Callable[..., Tensor], primals: Tree, tangents: Tree, eps: float = 1e-4) -> Any:
    """(∇f(x + εv) − ∇f(x − εv)) / 2ε: a central difference, error O(ε²)."""
    flat, unflatten = _flatten(primals)
    tflat = _tangents_like(primals, tangents)
    plus = _flatten(
        grad(fn, unflatten([p.detach() + eps * t for p, t in zip(flat, tflat, strict=True)]))
    )[0]
    minus = _flatten(
        grad(fn, unflatten([p.detach() - eps * t for p, t in zip(flat, tflat, strict=True)]))
    )[0]
    return unflatten([(a - b) / (2 * eps) for a, b in zip(plus, minus, strict=True)])


def _vec(tree: Tree) -> Tensor:
    return torch.cat([t.reshape(-1) for t in _flatten(tree)[0]])


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / max(‖b‖, tiny)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_hvp(
    fn: Callable[..., Tensor],
    primals: Tree,
    u: Tree | None = None,
    v: Tree | None = None,
    eps: float = 1e-4,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Compare reverse-over-reverse, forward-over-reverse and finite-difference HVPs.

    u, v default to random unit directions. Returns relative errors (float):
      rev_vs_fwd, rev_vs_fd, fwd_vs_fd: ‖Hv(a) − Hv(b)‖ / ‖Hv(b)‖;
      symmetry: |uᵀ(Hv) − vᵀ(Hu)| / (‖u‖‖Hv‖ + ‖v‖‖Hu‖), zero for an exact symmetric Hessian.
    """
    flat, unflatten = _flatten(primals)

    def rand_dir() -> Tree:
        ts = [
            torch.randn(p.shape, dtype=p.dtype, device=p.device, generator=generator) for p in flat
        ]
        n = torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
        return unflatten([t / n.to(t.dtype) for t in ts])

    u = rand_dir() if u is None else u
    v = rand_dir() if v is None else v
    hv_rr = _vec(hvp(fn, primals, v, "rev_rev"))
    hv_fr = _vec(hvp(fn, primals, v, "fwd_rev"))
    hv_fd = _vec(fd_hvp(fn, primals, v, eps))
    hu = _vec(hvp(fn, primals, u, "rev_rev"))
    uv = torch.cat([t.reshape(-1) for t in _tangents_like(primals, u, "u")])
    vv = torch.cat([t.reshape(-1) for t in _tangents_like(primals, v, "v")])
    sym_num = (uv.double() @ hv_rr.double() - vv.double() @ hu.double()).abs()
    sym_den = uv.double().norm() * hv_rr.double().norm() + vv.double().norm() * hu.double().norm()
    return {
        "rev_vs_fwd": rel_err(hv_rr, hv_fr),
        "rev_vs_fd": rel_err(hv_rr, hv_fd),
        "fwd_vs_fd": rel_err(hv_fr, hv_fd),
        "symmetry": float(sym_num / sym_den.clamp_min(1e-30)),
    }
