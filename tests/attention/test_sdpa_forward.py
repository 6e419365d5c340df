"""Forward semantics of theria.sdpa: parity with PyTorch's SDPA, masks, shapes, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import theria
from tests.attention.cases import BLOCK, CASES, Case
from theria import _warnings

BACKENDS = ["reference", "torch"]


def _torch_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_math_float64(case: Case, backend: str) -> None:
    q, k, v, kw = case.build(torch.float64)
    out = theria.sdpa(q, k, v, backend=backend, block_size=BLOCK, **kw)
    expected = _torch_math(q, k, v, **kw)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_parity_with_math_sdpa(backend: str) -> None:
    q, k, v = (torch.randn(2, 4, 97, 40) for _ in range(3))
    mask = torch.randn(97, 97)
    for kw in ({}, {"is_causal": True}, {"attn_mask": mask}):
        out = theria.sdpa(q, k, v, backend=backend, block_size=32, **kw)
        ref64 = _torch_math(
            q.double(),
            k.double(),
            v.double(),
            **{
                key: (val.double() if isinstance(val, torch.Tensor) else val)
                for key, val in kw.items()
            },
        )
        same_dtype = _torch_math(q, k, v, **kw)
        # The rule flash-attention uses: our float32 error against a float64 reference is at
        # most ~2x the error of PyTorch's own float32 computation (plus a float32 ulp floor).
        err = (out.double() - ref64).abs().max().item()
        base = (same_dtype.double() - ref64).abs().max().item()
        assert err <= 2 * base + 1e-6, (kw.keys(), err, base)


def test_dead_rows_are_zero_not_nan() -> None:
    q, k, v = (torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    for backend in BACKENDS:
        out = theria.sdpa(q, k, v, attn_mask=mask, backend=backend)
        assert torch.isfinite(out).all()
        assert (out[0, 1] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][0, 1] == 0).all()  # the dead query row gets no gradient


def test_float_mask_all_neg_inf_row_is_zero() -> None:
    q, k, v = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(3, 3, dtype=torch.float64)
    mask[2] = float("-inf")
    for backend in BACKENDS:
        out = theria.sdpa(q, k, v, attn_mask=mask, backend=backend, block_size=2)
        assert (out[2] == 0).all() and torch.isfinite(out).all()


def test_non_contiguous_and_expanded_inputs() -> None:
    base = torch.randn(2, 7, 3, 5, dtype=torch.float64)
    q = base.transpose(1, 2)  # (2, 3, 7, 5), non-contiguous
    k = torch.randn(1, 1, 6, 5, dtype=torch.float64).expand(2, 3, 6, 5)  # stride-0 dims
    v = torch.randn(2, 3, 5, 6, dtype=torch.float64).transpose(-1, -2)
    expected = _torch_math(q.contiguous(), k.contiguous(), v.contiguous())
    for backend in BACKENDS:
        out = theria.sdpa(q, k, v, backend=backend, block_size=4)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 2, 5, 7, 64])
def test_any_block_size_gives_the_same_result(block: int) -> None:
    q, k, v = (torch.randn(2, 5, 7, 3, dtype=torch.float64) for _ in range(3))
    out = theria.sdpa(q, k, v, is_causal=True, backend="torch", block_size=block)
    torch.testing.assert_close(out, _torch_math(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


def test_auto_is_torch_on_cpu_and_output_dtype() -> None:
    q, k, v = (torch.randn(2, 3, 4) for _ in range(3))
    out = theria.sdpa(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, theria.sdpa(q, k, v, backend="torch"))


def test_dropout_reference_reproducible_and_auto_falls_back_visibly() -> None:
    q, k, v = (torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.manual_seed(1)
    a = theria.sdpa(q, k, v, dropout_p=0.5, backend="reference")
    torch.manual_seed(1)
    b = theria.sdpa(q, k, v, dropout_p=0.5, backend="reference")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, theria.sdpa(q, k, v, backend="reference"))
    # The dropout mask lives in the graph: double backward sees the forward's mask.
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: _seeded_dropout(q, k, v), (q, k, v), eps=1e-6, atol=1e-5
    )
    with pytest.raises(NotImplementedError, match="dropout_p"):
        theria.sdpa(q, k, v, dropout_p=0.1, backend="torch")
    _warnings.forget("fallback:dropout_p")
    with pytest.warns(RuntimeWarning, match="falling back"):
        theria.sdpa(q, k, v, dropout_p=0.1)


def _seeded_dropout(q, k, v):
    torch.manual_seed(3)
    return theria.sdpa(q, k, v, dropout_p=0.3, backend="reference")


def test_float_mask_requiring_grad() -> None:
    q, k, v = (torch.randn(3, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        theria.sdpa(q, k, v, attn_mask=mask, backend="torch")
    with pytest.warns(RuntimeWarning, match="reference"):
        out = theria.sdpa(q, k, v, attn_mask=mask)
    (g,) = torch.autograd.grad(out.sum(), mask)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), mask)[0])


def _qkv(qs=(2, 4), ks=(3, 4), vs=(3, 4), **dtypes):
    return lambda: (
        torch.randn(qs).to(dtypes.get("q", torch.float32)),
        torch.randn(ks).to(dtypes.get("k", torch.float32)),
        torch.randn(vs),
    )


_B = torch.bool
BAD_INPUTS = [
    ("query must have at least 2 dims", _qkv(qs=(4,)), {}),
    ("share the last", _qkv(ks=(3, 5)), {}),
    ("same sequence length", _qkv(vs=(5, 4)), {}),
    ("key dtype", _qkv(k=torch.float64), {}),
    ("floating-point", _qkv(q=torch.long), {}),
    ("do not broadcast", _qkv((2, 5, 2, 4), (3, 5, 3, 4), (3, 5, 3, 4)), {}),
    ("enable_gqa", _qkv((1, 4, 2, 4), (1, 2, 3, 4), (1, 2, 3, 4)), {}),
    ("multiple", _qkv((1, 3, 2, 4), (1, 2, 3, 4), (1, 2, 3, 4)), {"enable_gqa": True}),
    ("attn_mask .* does not broadcast", _qkv(), {"attn_mask": torch.ones(2, 2, dtype=_B)}),
    ("attn_mask must be bool", _qkv(), {"attn_mask": torch.ones(2, 3, dtype=torch.long)}),
    (
        "either attn_mask or is_causal",
        _qkv(),
        {"attn_mask": torch.ones(2, 3, dtype=_B), "is_causal": True},
    ),
    ("dropout_p must be", _qkv(), {"dropout_p": 1.0}),
    ("backend must be", _qkv(), {"backend": "flash"}),
    ("block_size", _qkv(), {"block_size": 0}),
    ("needs CUDA tensors", _qkv(), {"backend": "triton"}),
    ("empty attention", _qkv(ks=(0, 4), vs=(0, 4)), {}),
    ("scale must be", _qkv(), {"scale": True}),
    ("block_size", _qkv(), {"block_size": True}),
    # a string flag is truthy: refused (PyTorch raises TypeError too), never taken as True
    ("is_causal must be a bool", _qkv(), {"is_causal": "False"}),
    ("is_causal must be a bool", _qkv(), {"is_causal": 1}),
    ("enable_gqa must be a bool", _qkv(), {"enable_gqa": "False"}),
    ("dropout_p must be a number", _qkv(), {"dropout_p": "0.1"}),
    ("dropout_p must be a number", _qkv(), {"dropout_p": None}),
    ("dropout_p must be in", _qkv(), {"dropout_p": float("nan")}),
    ("scale must be .* got a tensor of shape \\(1,\\)", _qkv(), {"scale": torch.ones(1)}),
    ("scale must be .* requires grad", _qkv(), {"scale": torch.tensor(0.5, requires_grad=True)}),
    ("scale must be", _qkv(), {"scale": "0.5"}),
    ("scale must be a finite", _qkv(), {"scale": float("inf")}),
    ("scale=1e\\+39 overflows torch.float32", _qkv(), {"scale": 1e39}),
    ("block_size must be a positive int; got 2.0", _qkv(), {"block_size": 2.0}),
    ("dense \\(strided\\)", lambda: (torch.randn(2, 4).to_sparse(), *_qkv()()[1:]), {}),
]


@pytest.mark.parametrize("match,build,kw", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(match, build, kw, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = build()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        theria.sdpa(q, k, v, **kw)


def test_error_names_shapes() -> None:
    with pytest.raises(ValueError) as e:
        theria.sdpa(torch.randn(2, 4), torch.randn(3, 5), torch.randn(3, 4))
    assert "(2, 4)" in str(e.value) and "(3, 5)" in str(e.value)


@pytest.mark.parametrize(
    ("dtype", "head", "batch", "triton_ok", "want"),
    [
        (torch.bfloat16, 128, 32, True, "triton"),
        (torch.float16, 100, 32, True, "triton"),
        (torch.bfloat16, 129, 32, True, "torch"),  # wider than the kernels take
        (torch.float32, 40, 32, True, "triton"),  # pads to 64: tf32x3 dots
        (torch.float32, 64, 32, True, "triton"),
        (torch.float32, 72, 32, True, "triton"),  # pads to 128: bf16x6 dots
        (torch.float32, 128, 32, True, "triton"),
        (torch.float32, 129, 32, True, "torch"),  # wider than the kernels take
        (torch.float64, 16, 32, True, "torch"),
        (torch.bfloat16, 64, 65535, True, "triton"),
        (torch.bfloat16, 64, 65536, True, "torch"),  # beyond CUDA's grid axis 1
        (torch.float32, 64, 65536, True, "torch"),
        (torch.bfloat16, 64, 32, False, "torch"),  # CPU tensors, or no Triton
        (torch.float32, 64, 32, False, "torch"),
    ],
)
def test_auto_backend_choice(dtype, head, batch, triton_ok, want) -> None:
    from theria.attention.api import auto_backend
    from theria.attention.kernels import MAX_HEAD_DIM

    asked = []

    def ok() -> bool:
        asked.append(1)
        return triton_ok

    assert auto_backend(dtype, head, batch, ok) == want
    if dtype == torch.float64:
        assert not asked  # float64 never imports Triton to decide
    if dtype == torch.float32 and triton_ok and batch < 65536:
        padded = max(16, 1 << (head - 1).bit_length())  # the float32 rule is the kernels' rule
        assert (want == "triton") == (padded <= MAX_HEAD_DIM)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a speed routing)")
def test_wide_float32_second_order_runs_blockwise_code_on_cuda() -> None:
    """float32 heads above 64: the first-order kernels, then the blockwise code for the
    second-order step (faster there), announced once; the HVP matches the torch backend's."""
    from theria import _warnings
    from theria.attention import triton_impl

    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 70, 72, device="cuda", generator=g, requires_grad=True)
               for _ in range(3))  # fmt: skip
    assert triton_impl._second_order_slow(q, v) is not None
    assert triton_impl._second_order_slow(q[..., :64], v[..., :64]) is None
    assert triton_impl._second_order_slow(q.double(), v.double()) is None

    def hvp(backend: str) -> tuple:
        out = theria.sdpa(q, k, v, is_causal=True, backend=backend)
        gs = torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)
        return torch.autograd.grad(sum(x.sum() for x in gs), (q, k, v))

    _warnings.forget()
    with pytest.warns(RuntimeWarning, match="second-order step"):
        got = hvp("triton")
    want = hvp("torch")
    for a, b in zip(got, want, strict=True):  # bf16x6 first order vs float32 torch ops
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_avoids_ieee_float32_dots(monkeypatch) -> None:
    """THERIA_FP32_WIDE_DOTS=ieee (FMA units, 20-45x slower than the torch backend): auto sends
    wide float32 heads to the torch backend again."""
    from theria.attention import kernels
    from theria.attention.api import auto_backend

    monkeypatch.setattr(kernels, "_FP32_DOTS", ("tf32x3", "ieee"))
    assert auto_backend(torch.float32, 72, 32, lambda: True) == "torch"
    assert auto_backend(torch.float32, 64, 32, lambda: True) == "triton"


def test_triton_backend_sends_batches_beyond_the_grid_to_blockwise_code() -> None:
    from theria.attention import triton_impl

    q = torch.empty(1, 1, 16).expand(65536, 1, 16)  # shapes only: nothing is allocated
    why = triton_impl._unsupported(q, q, q)
    assert why is not None and "65536" in why and "65535" in why
    assert triton_impl._unsupported(q[:65535], q[:65535], q[:65535]) is None
    k = torch.empty(1, 1, 16).expand(256, 1, 1, 16)  # broadcast batch: 256 x 256
    assert triton_impl._unsupported(q[:256], k, k) is not None


def test_explicit_triton_warns_where_auto_avoids_it(monkeypatch) -> None:
    from theria.attention import kernels
    from theria.attention.api import _slow_triton

    monkeypatch.setattr(kernels, "_FP32_DOTS", ("tf32x3", "ieee"))
    msg = _slow_triton(torch.float32, 72, True)
    assert msg is not None and "head dim 72" in msg and "backend='torch'" in msg
    assert _slow_triton(torch.float32, 64, True) is None  # tf32x3: fast
    assert _slow_triton(torch.bfloat16, 128, True) is None
    assert _slow_triton(torch.float32, 128, False) is None  # the interpreter: speed is moot
    assert _slow_triton(torch.float32, 129, True) is None  # blockwise code: not the kernels
    monkeypatch.setattr(kernels, "_FP32_DOTS", ("tf32x3", "bf16x6"))  # THERIA_FP32_WIDE_DOTS
    assert _slow_triton(torch.float32, 72, True) is None  # not IEEE dots: no such warning
