"""Issue 17: arguments PyTorch takes (numpy scalars, 0-d tensors, meta tensors), 16-bit inputs
at large logits, the interpreter's 16-bit refusal, non-finite inputs as docs/CONTRACT.md
describes them, and the 2× accuracy rule at large logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from theria import autodiff

BACKENDS = ["reference", "torch", "triton"]


def _skip_without_interpreter(backend: str) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs TRITON_INTERPRET=1 (CPU)")


def _math(*args, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "scale", [np.float32(0.5), np.float64(0.5), np.int64(2), torch.tensor(0.5), 2]
)
def test_scale_takes_what_pytorch_takes(backend, scale) -> None:
    _skip_without_interpreter(backend)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    got = theria.sdpa(q, k, v, scale=scale, backend=backend)
    torch.testing.assert_close(got, _math(q, k, v, scale=scale))


@pytest.mark.parametrize("dropout_p", [0, np.float64(0.0), torch.tensor(0.0)])
def test_dropout_p_takes_numbers_and_0d_tensors(dropout_p) -> None:
    q = torch.randn(2, 5, 8)
    torch.testing.assert_close(theria.sdpa(q, q, q, dropout_p=dropout_p), _math(q, q, q))


@pytest.mark.parametrize("flag", ["is_causal", "enable_gqa"])
@pytest.mark.parametrize("value", ["False", "True", 0, np.bool_(True), None])
def test_flags_must_be_bool(flag, value) -> None:
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match=f"{flag} must be a bool.*{type(value).__name__}"):
        theria.sdpa(q, q, q, **{flag: value})


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_meta_tensors_give_meta_results_in_every_mode(backend) -> None:
    """Shape inference on the meta device: output and every derivative mode, no data read."""
    x = tuple(torch.randn(1, 2, 5, 8, device="meta", requires_grad=True) for _ in range(3))
    u = tuple(torch.randn(1, 2, 5, 8, device="meta") for _ in range(3))

    def f(q, k, v):
        return theria.sdpa(q, k, v, is_causal=True, backend=backend).sum()

    results = [*autodiff.grad(f, x), *autodiff.hvp(f, x, u, "rev_rev")]
    results += [*autodiff.hvp(f, x, u, "fwd_rev"), autodiff.jvp(f, x, u)[1]]
    for r in results:
        assert r.is_meta
    assert [tuple(r.shape) for r in results[:3]] == [(1, 2, 5, 8)] * 3


def test_triton_refuses_meta_tensors_clearly() -> None:
    q = torch.randn(1, 2, 5, 8, device="meta")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors.*on meta"):
        theria.sdpa(q, q, q, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreter_refuses_16bit(dtype) -> None:
    """The interpreter's tl.dot is wrong in 16-bit (triton-lang/triton#11584): refuse, never
    return its values."""
    _skip_without_interpreter("triton")
    q = torch.randn(1, 2, 5, 8, dtype=dtype)
    msg = f"TRITON_INTERPRET=1 takes float32 or float64; got {dtype}"
    with pytest.raises(TypeError, match=msg):
        theria.sdpa(q, q, q, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_on_the_cpu_computes_in_float32(backend, dtype) -> None:
    """scale=1e4 overflows float16 scores (|S| > 65504): PyTorch's math path on the CPU is
    finite because it computes in float32; theria must be too, and agree with it, in the
    output and the gradients."""
    q = torch.randn(2, 2, 5, 8).to(dtype).requires_grad_(True)
    out = theria.sdpa(q, q, q, scale=1e4, backend=backend)
    want = _math(q, q, q, scale=1e4)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, want)
    (g,) = torch.autograd.grad(out.float().pow(2).sum(), q)
    (gw,) = torch.autograd.grad(want.float().pow(2).sum(), q)
    assert g.dtype == dtype and torch.isfinite(g).all()
    torch.testing.assert_close(g, gw, atol=2e-2 * gw.abs().max().item(), rtol=2e-2)


# --- non-finite inputs: what docs/CONTRACT.md ("Non-finite inputs") promises ----------------


def _nonfinite_case(where: str, value: float, masked: bool):
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 0, 1, 0] = value  # query row 1, or key/value row 1
    mask = None
    if masked:
        mask = torch.ones(4, 4, dtype=torch.bool)
        mask[:, 1] = False  # key 1 masked out for every query
    xs = tuple(t.requires_grad_(True) for t in (q, k, v))
    return xs, mask


def _run(backend, xs, mask):
    out = theria.sdpa(*xs, attn_mask=mask, backend=backend)
    grads = torch.autograd.grad(out.sum(), xs)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_query_row_stays_in_its_row(backend, value) -> None:
    _skip_without_interpreter(backend)
    xs, _ = _nonfinite_case("q", value, False)
    out, _ = _run(backend, xs, None)
    want = _math(*xs)
    # the same rows are non-finite as in PyTorch's math path, and finite rows agree
    assert torch.equal(torch.isfinite(out), torch.isfinite(want))
    ok = torch.isfinite(want)
    torch.testing.assert_close(out[ok], want[ok])
    other = torch.ones(4, dtype=torch.bool)
    other[1] = False
    assert torch.isfinite(out[0, 0, other]).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
def test_nonfinite_key_or_value_that_is_attended_poisons_every_row(backend, where) -> None:
    _skip_without_interpreter(backend)
    xs, _ = _nonfinite_case(where, float("nan"), False)
    out, _ = _run(backend, xs, None)
    assert torch.isnan(out[0, 0]).any(-1).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_masked_out_nonfinite_key_leaves_output_finite_but_not_dq(backend, value) -> None:
    """A masked-out key's score is replaced by -inf before exp: the output, dK and dV stay
    finite (PyTorch's math path, which adds the mask, gives NaN). dQ = scale·dS·K multiplies
    the zero dS of that key by its non-finite row: NaN, as any dense matmul gives."""
    _skip_without_interpreter(backend)
    xs, mask = _nonfinite_case("k", value, True)
    out, (dq, dk, dv) = _run(backend, xs, mask)
    assert torch.isfinite(out).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.isnan(dq[0, 0]).any(-1).all() and torch.isfinite(dq[0, 1]).all()
    keep = torch.ones(4, dtype=torch.bool)
    keep[1] = False
    clean = tuple(x.detach().clone() for x in xs)
    clean[1][0, 0, 1, 0] = 0.0  # the same problem with a finite masked-out key
    want = theria.sdpa(*clean, attn_mask=mask, backend="reference")
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_out_nonfinite_value_poisons_every_row(backend) -> None:
    """P·V multiplies the masked-out value row by P = 0: 0·NaN = NaN in every row, as in
    PyTorch's math path. Masking does not clean values."""
    _skip_without_interpreter(backend)
    xs, mask = _nonfinite_case("v", float("nan"), True)
    out, _ = _run(backend, xs, mask)
    assert torch.isnan(out[0, 0]).any(-1).all() and torch.isfinite(out[0, 1]).all()
    assert torch.isnan(_math(*xs, attn_mask=mask)[0, 0]).any(-1).all()


# --- accuracy at large logits: the 2× rule against PyTorch's math path ----------------------


def _hvp_errors(
    backend: str, scale: float, seed: int, device: str = "cpu"
) -> tuple[list[float], list[float]]:
    """Relative errors against float64 of theria's float32 (gradient, rev-rev HVP, fwd-rev HVP)
    and of PyTorch's float32 math path, q/k/v each."""
    g = torch.Generator().manual_seed(seed)
    x64 = [torch.randn(2, 2, 33, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    u64 = [torch.randn(2, 2, 33, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.randn(2, 2, 33, 8, generator=g, dtype=torch.float64)
    x64, u64, w = [t.to(device) for t in x64], [t.to(device) for t in u64], w.to(device)

    def loss(b, dtype):
        def f(q, k, v):
            o = (
                _math(q, k, v, scale=scale)
                if b == "math"
                else theria.sdpa(q, k, v, scale=scale, backend=b)
            )
            return (o * w.to(dtype)).sum()

        return f

    def all_modes(b, dtype, x, u):
        f = loss(b, dtype)
        return [*autodiff.grad(f, x), *autodiff.hvp(f, x, u, "rev_rev"),
                *autodiff.hvp(f, x, u, "fwd_rev")]  # fmt: skip

    want = all_modes("reference", torch.float64, x64, u64)
    x32, u32 = [t.float() for t in x64], [t.float() for t in u64]

    def err(got):
        return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want, strict=True)]

    return err(all_modes(backend, torch.float32, x32, u32)), err(
        all_modes("math", torch.float32, x32, u32)
    )


def summed_errors(
    backend: str, scale: float, seeds=(0, 1, 2), device: str = "cpu"
) -> tuple[list[float], list[float]]:
    """`_hvp_errors` summed over seeds (theria's, the math path's): what the 2× rule compares,
    so that one lucky seed of the math path does not decide."""
    ours, math = [0.0] * 9, [0.0] * 9
    for seed in seeds:
        a, b = _hvp_errors(backend, scale, seed, device=device)
        ours = [x + y for x, y in zip(ours, a, strict=True)]
        math = [x + y for x, y in zip(math, b, strict=True)]
    return ours, math


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_torch_backend_meets_2x_rule_at_large_logits(scale) -> None:
    """E=8, scale=10: logits up to |S| ≈ 100. Before issue 17 the double backward w.r.t. V had
    4.8× (scale 10) and 11× (scale 100) the math path's error: the rows of P recomputed from a
    float32 lse summed to 1 only within |lse|·ε. Errors of seeds summed, so one lucky seed of
    the math path does not decide; 1e-7 relative is float32's floor."""
    ours, math = summed_errors("torch", scale)
    names = [f"{m}/{t}" for m in ("grad", "rev_rev", "fwd_rev") for t in "qkv"]
    bad = [(n, o, m) for n, o, m in zip(names, ours, math, strict=True) if o > 2 * m + 3e-7]
    assert not bad, bad


@pytest.mark.slow
def test_torch_backend_meets_2x_rule_at_scale_100() -> None:
    ours, math = _hvp_errors("torch", 100.0, 0)
    assert all(o <= 2 * m + 1e-7 for o, m in zip(ours, math, strict=True)), (ours, math)


# The Triton kernels keep a float64 lse for float32 inputs and subtract it as hi + lo, and round
# the scaled scores once (theria/attention/kernels/lse.py: a multiply fused into the lse
# subtraction had made the recomputed P inconsistent with the forward's lse, 2.5× the math
# path's error at scale 10 on an H200). On CUDA they meet the 2× rule like the torch backend.
# Under the interpreter numpy's float32 matmul rounds a tile's products differently by its
# shape and orientation, so a recomputed score is not the forward's bit for bit: measured at
# E=8, scale=10, seed 0: 9.1× (rev-rev HVP w.r.t. V) -> bound 12×.
TRITON_LARGE_LOGIT_BOUND = {"cuda": 2.0, "interpreter": 12.0}


@pytest.mark.slow
def test_triton_large_logit_error_within_documented_bound() -> None:
    _skip_without_interpreter("triton")
    ours, math = _hvp_errors("triton", 10.0, 0)
    bound = TRITON_LARGE_LOGIT_BOUND["interpreter"]
    assert all(o <= bound * m + 3e-7 for o, m in zip(ours, math, strict=True)), (ours, math)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_large_logit_accuracy_on_cuda(backend, scale) -> None:
    """The 2× rule on a GPU (tf32x3 dots for the float32 kernels), errors of seeds 0-2 summed
    as in the CPU test. Prints the factors for the record."""
    ours, math = summed_errors(backend, scale, device="cuda")
    factors = [round(o / m, 2) for o, m in zip(ours, math, strict=True)]
    print(f"{backend} scale {scale}: error / math-path error per (mode, input): {factors}")
    bound = 2.0 if backend == "torch" else TRITON_LARGE_LOGIT_BOUND["cuda"]
    assert all(o <= bound * m + 3e-7 for o, m in zip(ours, math, strict=True)), factors
