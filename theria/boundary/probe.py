"""`probe`: which derivatives an attention callable really supports, and how it fails.

An attention path is any callable ``(q, k, v) -> out`` on (B, H, L, E) tensors. `probe` runs
it through nine capabilities on tiny seeded inputs and compares every number it returns with a
float64 oracle (an explicit composition, differentiated by autograd):

    forward          out
    vjp              ∂⟨out, W⟩/∂(q, k, v)
    double_backward  reverse-over-reverse HVP: grad of ⟨∇⟨out, W⟩, u⟩ (create_graph=True)
    forward_ad       forward_ad dual tensors: the tangent of out along (tq, tk, tv)
    func_jvp         torch.func.jvp of the same
    fwd_rev_hvp      forward-over-reverse HVP: torch.func.jvp of torch.func.grad
    vmap             torch.func.vmap of out and of per-sample gradients
    hessian          torch.func.hessian of ⟨out, W⟩ with respect to q
    maml             one-step MAML meta-gradient d L_q(θ − α ∇L_s(θ)) / dθ, θ = (q, k, v)

The losses are linear in the output (⟨out, W⟩, a linear read-out). That choice matters: on
torch 2.14 a torch.compile'd math-SDPA path returns ``None`` second derivatives for such a loss
(silent; a MAML meta-gradient quietly becomes FO-MAML's), while a loss quadratic in ``out``
makes the same path raise "torch.compile with aot_autograd does not currently support double
backward". The probe tests the case that can hide.

Each capability is classified as one of `Status`: works (with its relative error), explicit
failure (the exception, and the aten op and missing derivative parsed from it), silent failure
(wrong values, ``None`` gradients or tangents, gradients without a graph under
``create_graph=True``) or unsupported input (no kernel for this dtype/device).
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from theria.attention.contract import Problem
from theria.attention.reference import reference_attention

AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]

CAPABILITIES: tuple[str, ...] = (
    "forward",
    "vjp",
    "double_backward",
    "forward_ad",
    "func_jvp",
    "fwd_rev_hvp",
    "vmap",
    "hessian",
    "maml",
)

# What each capability makes computable, for the failure contract's "therefore Y".
CAPABILITY_USES: dict[str, str] = {
    "forward": "the output itself",
    "vjp": "gradients (VJPs)",
    "double_backward": "reverse-over-reverse Hessian-vector products",
    "forward_ad": "forward-mode JVPs with dual tensors",
    "func_jvp": "torch.func.jvp",
    "fwd_rev_hvp": "forward-over-reverse Hessian-vector products",
    "vmap": "vmap-batched outputs and per-sample gradients",
    "hessian": "torch.func.hessian",
    "maml": "the second-order MAML meta-gradient",
}

DEFAULT_SHAPE = (1, 2, 6, 16)  # (B, H, L, E), S = L; E = 16, the smallest head dim every
# fused kernel (flash, cuDNN, FlexAttention's Triton template) accepts
MAML_LR = 0.5  # inner step α: large enough that the second-order term is O(1) of the meta-grad

# A capability "works" when its relative error against the float64 oracle is below this bound.
# A broken derivative (a lost or doubled term, a detached graph) is an O(1) relative error; the
# rounding error of a correct computation at these sizes (L = S = 6, E = 16, second derivatives
# of a softmax) stays within ~10³ unit roundoffs: float64 1e-13, float32 1e-4, half 1e-2 (eps
# 9.8e-4), bfloat16 ~5e-2 (eps 7.8e-3). Measured on the CPU (torch 2.14) over every capability
# of sdpa math, the explicit composition and theria's backends, the largest errors were 7e-16,
# 3e-7, 1.4e-3 and 1.2e-2. Each bound sits well above these and far below O(1).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 2e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 2e-1,
}


class Status(str, Enum):
    WORKS = "works"
    EXPLICIT = "explicit failure"
    SILENT = "silent failure"
    UNSUPPORTED = "unsupported input"
    UNAVAILABLE = "unavailable"


@dataclass
class CapResult:
    """The outcome of one capability: status, relative error (works / wrong values), the
    exception (explicit failures), the parsed aten op and missing derivative, and a detail."""

    capability: str
    status: Status
    rel_err: float | None = None
    error: str | None = None
    op: str | None = None
    missing: str | None = None
    detail: str | None = None

    def short(self) -> str:
        if self.status is Status.WORKS:
            return f"works ({self.rel_err:.1e})"
        if self.status is Status.EXPLICIT:
            return "explicit: " + (self.missing or (self.error or "")[:60])
        if self.status is Status.SILENT:
            return f"SILENT: {self.detail}"
        return self.status.value


@dataclass
class ProbeResult:
    """All capabilities of one path at one (device, dtype). ``available`` is False when the
    path does not exist in this build/device (then ``reason`` says why and ``results`` is
    empty)."""

    name: str
    device: str
    dtype: str
    available: bool = True
    reason: str | None = None
    results: dict[str, CapResult] = field(default_factory=dict)
    seconds: float = 0.0

    def status(self, capability: str) -> Status:
        if not self.available:
            return Status.UNAVAILABLE
        return self.results[capability].status

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results"] = {k: {**asdict(r), "status": r.status.value} for k, r in self.results.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        """Inverse of `to_dict` (reports can be rendered from a saved JSON)."""
        results = {
            k: CapResult(**{**r, "status": Status(r["status"])}) for k, r in d["results"].items()
        }
        return cls(**{**d, "results": results})


class Unavailable(Exception):
    """Raised by a path factory when the path does not exist in this build or on this device."""


class _Silent(Exception):
    """Raised inside a capability check: the path returned something that is silently wrong."""


# ----------------------------------------------------------------------------- error parsing

_UNSUPPORTED_PATTERNS = (
    r"not implemented for '(Half|BFloat16|Float|Double|ComplexFloat)'",
    r"[Oo]nly (support|supports) (fp16|bf16|float16|bfloat16|half)",
    r"[Nn]o available kernel",
    r"expected .*dtype",
    r"[Ff]lash[A-Za-z ]* only supports",
    r"dtype .* not supported",
    r"[Uu]nsupported dtype",
    r"supported in FlexAttention for \w+ device",
)

# (pattern, group of the op, description of what is missing)
_MISSING_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"derivative for (aten::[\w.]+) is not implemented", "the derivative of {op}"),
    (
        r"Trying to use forward AD with ([\w.:]+) that does not support it",
        "the forward-mode derivative of {op}",
    ),
    (r"[Bb]atching rule not implemented for (aten::[\w.]+)", "a vmap batching rule for {op}"),
    (r"must implement the jvp function", "the jvp of a custom autograd.Function"),
    (r"must override the setup_context", "setup_context (torch.func support) of a Function"),
    (
        r"compiled with non-empty donated buffers",
        "a double backward of the compiled backward graph",
    ),
    (r"does not currently support double backward", "a double backward of the compiled graph"),
    (
        r"does not require grad and does not have a grad_fn",
        "a gradient graph under create_graph=True",
    ),
    (r"does not support backward", "a backward"),
    (r"input tensors that carry a forward-mode AD tangent", "forward-mode AD under torch.compile"),
    (r"(\w+) is not differentiable twice", "the derivative of {op}"),
)


def parse_error(exc: BaseException) -> tuple[str, str | None, str | None]:
    """(one-line error text, aten op or None, missing derivative or None) of an exception."""
    text = f"{type(exc).__name__}: {exc}"
    first = " ".join(text.split())[:400]
    for pattern, missing in _MISSING_PATTERNS:
        m = re.search(pattern, text)
        if m:
            op = m.group(1) if m.groups() else None
            if op is not None and not op.startswith("aten::") and "{op}" in missing:
                op = f"aten::{op}" if re.fullmatch(r"_?[a-z][\w.]*", op) else op
            return first, op, missing.format(op=op)
    m = re.search(r"(aten::[\w.]+)", text) or re.search(r"torch\.ops\.(higher_order\.\w+)", text)
    return first, (m.group(1) if m else None), None


def _is_unsupported_input(exc: BaseException) -> bool:
    return any(re.search(p, str(exc)) for p in _UNSUPPORTED_PATTERNS)


# ----------------------------------------------------------------------------- comparisons


def _rel(got: list[Tensor], want: list[Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over the concatenation, in float64 on the CPU."""
    a = torch.cat([g.detach().to("cpu", torch.float64).reshape(-1) for g in got])
    b = torch.cat([w.detach().to("cpu", torch.float64).reshape(-1) for w in want])
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _need(xs: tuple[Tensor | None, ...] | list[Tensor | None], what: str) -> list[Tensor]:
    missing = [i for i, x in enumerate(xs) if x is None]
    if missing:
        names = ", ".join("qkv"[i] if len(xs) == 3 else str(i) for i in missing)
        raise _Silent(f"{what} is None for {names}")
    return list(xs)  # type: ignore[arg-type]


def _need_graph(gs: list[Tensor]) -> None:
    flat = [i for i, g in enumerate(gs) if not g.requires_grad]
    if flat:
        names = ", ".join("qkv"[i] for i in flat)
        raise _Silent(f"gradient for {names} has no graph under create_graph=True")


# ----------------------------------------------------------------------------- the quantities


@dataclass
class _Inputs:
    q: Tensor
    k: Tensor
    v: Tensor
    w: Tensor  # cotangent of out (the loss is ⟨out, w⟩)
    w2: Tensor  # cotangent of the MAML query loss
    u: tuple[Tensor, Tensor, Tensor]  # HVP direction
    t: tuple[Tensor, Tensor, Tensor]  # JVP direction

    def to(self, device: torch.device | str, dtype: torch.dtype) -> _Inputs:
        def c(x: Tensor) -> Tensor:
            return x.detach().to(device=device, dtype=dtype)

        return _Inputs(
            c(self.q), c(self.k), c(self.v), c(self.w), c(self.w2),
            (c(self.u[0]), c(self.u[1]), c(self.u[2])),
            (c(self.t[0]), c(self.t[1]), c(self.t[2])),
        )  # fmt: skip


def _make_inputs(shape: tuple[int, int, int, int], seed: int) -> _Inputs:
    g = torch.Generator().manual_seed(seed)

    def r() -> Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float64)

    return _Inputs(r(), r(), r(), r(), r(), (r(), r(), r()), (r(), r(), r()))


def _loss(fn: AttnFn, w: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda q, k, v: (fn(q, k, v) * w).sum()


def _leaves(x: _Inputs) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.detach().requires_grad_(True) for t in (x.q, x.k, x.v))  # type: ignore


def _forward(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    with torch.no_grad():
        return [fn(x.q, x.k, x.v)]


def _vjp(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    q, k, v = _leaves(x)
    with torch.enable_grad():
        out = fn(q, k, v)
        gs = torch.autograd.grad(out, (q, k, v), x.w, allow_unused=True)
    return _need(gs, "gradient")


def _double_backward(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    q, k, v = _leaves(x)
    with torch.enable_grad():
        loss = _loss(fn, x.w)(q, k, v)
        gs = _need(torch.autograd.grad(loss, (q, k, v), create_graph=True, allow_unused=True),
                   "gradient")  # fmt: skip
        _need_graph(gs)
        dot = sum((g * u).sum() for g, u in zip(gs, x.u, strict=True))
        hv = torch.autograd.grad(dot, (q, k, v), allow_unused=True)
    return _need(hv, "second derivative")


def _forward_ad(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip((x.q, x.k, x.v), x.t, strict=True)]
        out = fn(*duals)
        tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:
            raise _Silent("the output carries no tangent (forward-mode derivative dropped)")
        return [tangent.clone()]


def _func_jvp(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    _, tangent = torch.func.jvp(fn, (x.q, x.k, x.v), x.t)
    return _need([tangent], "tangent")


def _fwd_rev_hvp(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    g = torch.func.grad(_loss(fn, x.w), argnums=(0, 1, 2))
    _, hv = torch.func.jvp(g, (x.q, x.k, x.v), x.u)
    return _need(hv, "forward-over-reverse tangent")


def _stack(x: Tensor) -> Tensor:
    return torch.stack([x, 0.5 * x.flip(-2)])  # (2, B, H, L, E): two distinct samples


def _vmap(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    qs, ks, vs, ws = (_stack(t) for t in (x.q, x.k, x.v, x.w))
    out = torch.func.vmap(fn)(qs, ks, vs)
    per_sample = torch.func.vmap(
        lambda q, k, v, w: torch.func.grad(_loss(fn, w), argnums=(0, 1, 2))(q, k, v)
    )(qs, ks, vs, ws)
    return [out, *_need(per_sample, "per-sample gradient")]


def _hessian(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    # (B, H, L, E) -> Hessian (B, H, L, E, B, H, L, E) of the scalar ⟨out, w⟩ in q alone
    h = torch.func.hessian(lambda q: _loss(fn, x.w)(q, x.k, x.v))(x.q)
    return _need([h], "hessian")


def _maml_grads(fn: AttnFn, x: _Inputs, first_order: bool) -> list[Tensor]:
    """d/dθ of L_q(θ − α ∇L_s(θ)), θ = (q, k, v), L_s = ⟨fn(θ), w⟩, L_q = ⟨fn(θ'), w2⟩
    (Finn et al. 2017, MAML, eq. 1; first_order drops the Hessian term as FO-MAML does)."""
    theta = _leaves(x)
    with torch.enable_grad():
        gs = _need(
            torch.autograd.grad(_loss(fn, x.w)(*theta), theta, create_graph=not first_order,
                                allow_unused=True),
            "inner gradient",
        )  # fmt: skip
        adapted = [p - MAML_LR * g for p, g in zip(theta, gs, strict=True)]
        meta = torch.autograd.grad(_loss(fn, x.w2)(*adapted), theta, allow_unused=True)
    return _need(meta, "meta-gradient")


def _maml(fn: AttnFn, x: _Inputs) -> list[Tensor]:
    return _maml_grads(fn, x, first_order=False)


_CHECKS: dict[str, Callable[[AttnFn, _Inputs], list[Tensor]]] = {
    "forward": _forward,
    "vjp": _vjp,
    "double_backward": _double_backward,
    "forward_ad": _forward_ad,
    "func_jvp": _func_jvp,
    "fwd_rev_hvp": _fwd_rev_hvp,
    "vmap": _vmap,
    "hessian": _hessian,
    "maml": _maml,
}
# The oracle computes the same quantities (reverse-over-reverse for the HVP) in float64.
_ORACLE_CHECKS = {**_CHECKS, "fwd_rev_hvp": _double_backward}


def explicit_composition(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The float64 oracle: softmax(q kᵀ / √E) v through theria's `reference` backend."""
    problem = Problem(scale=q.shape[-1] ** -0.5, is_causal=False)
    return reference_attention(q, k, v, None, problem)


# ----------------------------------------------------------------------------- probe


def _run_check(
    name: str, fn: AttnFn, x: _Inputs, want: list[Tensor], fo: list[Tensor] | None, tol: float
) -> CapResult:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = _CHECKS[name](fn, x)
    except _Silent as e:
        return CapResult(name, Status.SILENT, detail=str(e))
    except Exception as e:  # every failure is a result: the probe reports, never stops
        text, op, missing = parse_error(e)
        status = Status.UNSUPPORTED if _is_unsupported_input(e) else Status.EXPLICIT
        return CapResult(name, status, error=text, op=op, missing=missing)
    if [tuple(g.shape) for g in got] != [tuple(w.shape) for w in want]:
        return CapResult(
            name, Status.SILENT,
            detail=f"shapes {[tuple(g.shape) for g in got]}, expected "
                   f"{[tuple(w.shape) for w in want]}",
        )  # fmt: skip
    err = _rel(got, want)
    if err <= tol:
        return CapResult(name, Status.WORKS, rel_err=err)
    detail = f"wrong values: rel. error {err:.2e} > {tol:.0e}"
    if fo is not None and _rel(got, fo) <= tol:
        detail = "second-order term lost: the meta-gradient equals FO-MAML's"
    if not all(torch.isfinite(g).all() for g in got):
        detail = "non-finite values"
    return CapResult(name, Status.SILENT, rel_err=err, detail=detail)


def _mark_unsupported(result: ProbeResult) -> None:
    """No kernel for this input in the forward: every other capability is moot, not broken."""
    fwd = result.results.get("forward")
    if fwd is not None and fwd.status is Status.UNSUPPORTED:
        for cap, r in result.results.items():
            if r.status is not Status.WORKS:
                result.results[cap] = CapResult(cap, Status.UNSUPPORTED, error=fwd.error)


def probe(
    attn_fn: AttnFn,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    name: str | None = None,
    reference: AttnFn | None = None,
    shape: tuple[int, int, int, int] = DEFAULT_SHAPE,
    capabilities: tuple[str, ...] = CAPABILITIES,
    seed: int = 0,
) -> ProbeResult:
    """Probe which derivatives ``attn_fn`` supports, and how the others fail.

    Args:
        attn_fn: ``(q, k, v) -> out``, q, k, v and out of shape ``shape`` = (B, H, L, E).
        device, dtype: where and in what precision the path runs.
        name: label for reports (defaults to the callable's name).
        reference: the float64 oracle for this path (defaults to the explicit composition
            softmax(q kᵀ/√E) v); it runs on the CPU, on the same (rounded) inputs.
        capabilities: a subset of `CAPABILITIES`.

    Returns:
        A `ProbeResult`; every capability is classified, none raises.
    """
    unknown = set(capabilities) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"probe: unknown capabilities {sorted(unknown)}; know {CAPABILITIES}")
    if dtype not in TOLERANCES:
        raise ValueError(f"probe: dtype must be one of {list(TOLERANCES)}; got {dtype}")
    t0 = time.perf_counter()
    name = name or getattr(attn_fn, "__name__", type(attn_fn).__name__)
    reference = reference or explicit_composition
    x64 = _make_inputs(shape, seed)
    x = x64.to(device, dtype)
    x64 = x.to("cpu", torch.float64)  # the oracle sees exactly the rounded inputs
    result = ProbeResult(name=name, device=str(torch.device(device)), dtype=str(dtype)[6:])
    for cap in capabilities:
        want = _ORACLE_CHECKS[cap](reference, x64)
        fo = _maml_grads(reference, x64, first_order=True) if cap == "maml" else None
        result.results[cap] = _run_check(cap, attn_fn, x, want, fo, TOLERANCES[dtype])
    _mark_unsupported(result)
    result.seconds = time.perf_counter() - t0
    return result
