"""Property-based shape fuzz: random batch shapes, lengths, head dims, masks, GQA, block sizes.
The torch backend's output and gradients equal the reference backend's in float64."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import theria


@st.composite
def problems(draw):
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    L, S = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    E, Ev = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    gqa = draw(st.booleans())
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3)) if gqa else hkv
    qshape = (*batch, hq, L, E)
    kshape = (*batch, hkv, S, E)
    vshape = (*batch, hkv, S, Ev)
    kind = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    kw: dict = {"enable_gqa": gqa}
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "causal":
        kw["is_causal"] = True
    elif kind in ("bool", "float"):
        # a mask broadcast from a random subset of the leading dims
        full = (*batch, hq, L, S)
        mshape = (*tuple(d if draw(st.booleans()) else 1 for d in full[:-2]), L, S)
        mshape = mshape[draw(st.integers(0, len(mshape) - 2)) :]
        if kind == "bool":
            kw["attn_mask"] = torch.rand(mshape, generator=g) > 0.3
        else:
            kw["attn_mask"] = torch.randn(mshape, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.1, 2.0))
    block = draw(st.integers(1, 10))
    tensors = [
        torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(True)
        for s in (qshape, kshape, vshape)
    ]
    return tensors, kw, block


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_torch_backend_matches_reference(problem) -> None:
    (q, k, v), kw, block = problem
    out = theria.sdpa(q, k, v, backend="torch", block_size=block, **kw)
    ref = theria.sdpa(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-12)
    w = torch.randn_like(ref)
    g_out = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_out, g_ref, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
