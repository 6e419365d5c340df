"""`theria.attention.kernels.launch` and the launch plans of the Triton backend.

The argument bookkeeping is checked on the CPU. The fast path itself (a compiled kernel launched
again with new data pointers) exists only on CUDA: those tests compare it bitwise with Triton's
own launch path and run where a GPU is present (the lent H100 in this project's GPU runs).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from theria.attention.kernels import launch as L


def _toy(X, n, B: tl.constexpr, Y, C: tl.constexpr = 3):
    pass


def test_signature_orders_runtime_and_constexpr_parameters():
    sig = L._Signature(triton.runtime.JITFunction(_toy))
    assert sig.order == [("X", False), ("n", False), ("B", True), ("Y", False), ("C", True)]
    assert sig.runtime_pos == [0, 1, 3]
    assert sig.values(["x", 7, "y"], {"B": 5}) == ["x", 7, 5, "y", 3]
    assert sig.values(["x", 7, "y"], {"B": 5, "C": 9}) == ["x", 7, 5, "y", 9]


def test_argument_keys_separate_what_triton_specializes_on():
    # integers: equal to 1, divisible by 16, and the integer type Triton picks
    keys = {L._arg_key(n) for n in (1, 2, 16, 32, 2**31, 2**63)}
    assert len({L._arg_key(1), L._arg_key(2), L._arg_key(16)}) == 3
    assert L._arg_key(16) == L._arg_key(32)
    assert L._arg_key(16) != L._arg_key(2**32) != L._arg_key(2**64)
    assert len(keys) == 5  # 16 and 32 share one
    # tensors: dtype and 16-byte alignment of the address
    x = torch.zeros(64, dtype=torch.float32)
    assert L._arg_key(x) != L._arg_key(x[1:])  # 4 bytes off
    assert L._arg_key(x) == L._arg_key(x[4:])  # 16 bytes off
    assert L._arg_key(x) != L._arg_key(x.to(torch.float64))


def test_layout_key_covers_shape_strides_dtype_alignment():
    x = torch.zeros(4, 8, 16)
    assert L.layout_key(x) == L.layout_key(torch.zeros(4, 8, 16))
    assert L.layout_key(x) != L.layout_key(x.transpose(-1, -2).contiguous().transpose(-1, -2))
    assert L.layout_key(x) != L.layout_key(x.double())
    assert L.layout_key(x.view(-1)[1:]) != L.layout_key(x.view(-1)[4:])
    assert L.layout_key(None) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast launch path is CUDA-only")


def _results(x, u, kw):
    """Gradient, both HVP modes and the fused JVP through backend='triton'."""
    import theria
    from theria import autodiff
    from theria.attention.triton_impl import sdpa_jvp

    def loss(q, k, v):
        return 0.5 * theria.sdpa(q, k, v, backend="triton", **kw).float().pow(2).sum()

    out = list(autodiff.grad(loss, x))
    for mode in ("rev_rev", "fwd_rev"):
        out += list(autodiff.hvp(loss, x, u, mode))
    out.append(sdpa_jvp(*x, *u, **kw)[1])
    return out


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "misaligned"])
def test_plans_and_fast_launch_match_tritons_launch(dtype, layout, monkeypatch):
    from theria.attention import triton_impl
    from theria.attention.kernels import second_order

    g = torch.Generator("cuda").manual_seed(0)
    B, H, N, E = 2, 3, 300, 64

    def make():
        if layout == "transposed":  # (B, N, H, E) memory viewed as (B, H, N, E)
            t = torch.randn(B, N, H, E, generator=g, device="cuda", dtype=dtype)
            return t.transpose(1, 2)
        if layout == "misaligned":  # an address 2 elements past a 16-byte boundary
            flat = torch.randn(B * H * N * E + 2, generator=g, device="cuda", dtype=dtype)
            return flat[2:].view(B, H, N, E)
        return torch.randn(B, H, N, E, generator=g, device="cuda", dtype=dtype)

    x, u = tuple(make() for _ in range(3)), tuple(make() for _ in range(3))
    kw = {"is_causal": True}
    monkeypatch.setattr(L, "_DISABLED", True)
    want = _results(x, u, kw)
    monkeypatch.setattr(L, "_DISABLED", False)
    for _ in range(3):  # first call: Triton's path, stores plans; then the plans
        got = _results(x, u, kw)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert triton_impl._PLANS and second_order._PLANS
    # new tensors with the same layout reuse the plans and read the new data
    x2 = tuple(make() for _ in range(3))
    monkeypatch.setattr(L, "_DISABLED", True)
    want2 = _results(x2, u, kw)
    monkeypatch.setattr(L, "_DISABLED", False)
    got2 = _results(x2, u, kw)
    assert all(torch.equal(a, b) for a, b in zip(got2, want2, strict=True))


class _FakeCompiled:
    """Stands in for Triton's CompiledKernel: records what its launcher receives."""

    function, packed_metadata = "fn", "meta"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def launch_metadata(self, grid, stream, *values):
        return None

    def run(self, *args):
        self.calls.append(args)


def test_prepared_launch_swaps_arguments_and_refuses_missing_ones(monkeypatch):
    monkeypatch.setattr(L, "_stream", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    c = _FakeCompiled()
    # runtime args (a, b, n) at parameter positions 0, 2, 3; a constexpr at 1
    prep = L.Prepared(c, (4, 2, 1), ["a0", 16, "b0", 5], [0, 2, 3])
    kept = prep.without([0, 1])
    assert prep.values == ["a0", 16, "b0", 5]  # the original is unchanged
    assert kept.values == [None, 16, None, 5]  # the stored launch holds no tensors
    kept.run([(0, "a1"), (1, "b1")])
    grid_and_stream, values = c.calls[-1][:4], c.calls[-1][9:]
    assert grid_and_stream == (4, 2, 1, 7) and values == ("a1", 16, "b1", 5)
    with pytest.raises(RuntimeError, match=r"without arguments \[1\]"):
        kept.run([(0, "a2")])


class _FakeScratchCompiled(_FakeCompiled):
    """A compiled kernel that needs global scratch (as the TMA path's do): its launcher records
    which allocator Triton would call for it."""

    class metadata:  # Triton's attribute name
        global_scratch_size = 128

    def run(self, *args):
        from triton.runtime import _allocation

        self.calls.append((_allocation._allocator.get(), *args))


@pytest.mark.skipif(not L.SCRATCH, reason="this Triton keeps no launch allocator to scope")
def test_scratch_kernels_get_torch_scratch_only_during_their_launch(monkeypatch):
    """Triton refuses a kernel that needs global scratch unless an allocator was set; a prepared
    launch of one sets PyTorch's for the launch only, and keeps one the program set."""
    from triton.runtime import _allocation

    monkeypatch.setattr(L, "_stream", lambda device: 7)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    c = _FakeScratchCompiled()
    prep = L.Prepared(c, (1, 1, 1), ["a"], [0])
    assert prep.scratch and not L.Prepared(_FakeCompiled(), (1, 1, 1), ["a"], [0]).scratch
    before = _allocation._allocator.get()
    prep.run(())
    assert c.calls[-1][0] is L._torch_scratch
    assert _allocation._allocator.get() is before  # restored after the launch
    mine = lambda size, align, stream: None  # noqa: E731
    token = _allocation._allocator.set(mine)
    try:
        prep.run(())
        assert c.calls[-1][0] is mine  # the program's own allocator is kept
    finally:
        _allocation._allocator.reset(token)
