"""The causal grids' tile order (`theria.attention.kernels.schedule`) under TRITON_INTERPRET=1:
the mapping from launch position to tile is a permutation, longest tiles first within L2
sections of heads; and with the sections cut small (a tiny L2 budget) every first- and
second-order mode still matches the `reference` backend in float64."""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")

import triton
import triton.language as tl

import theria
from theria.attention.kernels import schedule as lpt

pytestmark = pytest.mark.triton_interpret


@pytest.fixture(scope="module")
def schedule():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported")
    return lpt


@triton.jit
def _tile_2d(OUT, rows, ROW_BYTES: tl.constexpr, CAUSAL: tl.constexpr, QM: tl.constexpr):
    block, z = lpt.grid_tile(rows, ROW_BYTES, CAUSAL, QM)
    t = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    tl.store(OUT + 2 * t, block)
    tl.store(OUT + 2 * t + 1, z)


@triton.jit
def _tile_1d(OUT, n_blk, rows, ROW_BYTES: tl.constexpr, CAUSAL: tl.constexpr, QM: tl.constexpr):
    block, z = lpt.grid_block(n_blk, rows, ROW_BYTES, CAUSAL, QM)
    t = tl.program_id(0)
    tl.store(OUT + 2 * t, block)
    tl.store(OUT + 2 * t + 1, z)


def _order(schedule, n_blk, n_z, rows, row_bytes, causal, query_major, one_d):
    tile_2d, tile_1d = _tile_2d, _tile_1d
    out = torch.full((n_blk * n_z, 2), -1, dtype=torch.int32)
    if one_d:
        tile_1d[(n_blk * n_z,)](out, n_blk, rows, row_bytes, causal, query_major)
    else:
        tile_2d[(n_blk, n_z)](out, rows, row_bytes, causal, query_major)
    return [tuple(x) for x in out.tolist()]  # (block, z) in launch order


@pytest.mark.parametrize("one_d", [False, True], ids=["2d", "1d"])
@pytest.mark.parametrize("query_major", [True, False], ids=["query_major", "key_major"])
@pytest.mark.parametrize(
    ("n_blk", "n_z", "budget", "sections"),
    [
        (4, 5, 300, [2, 2, 1]),  # 128 bytes per element: two fit, the last section is short
        (3, 4, 1, [1, 1, 1, 1]),  # nothing fits: one element per section (per-head order)
        (5, 3, 50 * 2**20, [3]),  # all fit: one section
        (1, 3, 300, [2, 1]),  # one block per element
        (3, 1, 300, [1]),
    ],
)
def test_causal_order_is_longest_first_in_sections(
    schedule, monkeypatch, n_blk, n_z, budget, sections, query_major, one_d
):
    monkeypatch.setattr(schedule, "LPT_L2_BYTES", tl.constexpr(budget))
    rows, row_bytes = 8, 16  # 128 bytes of keys per batch element
    got = _order(schedule, n_blk, n_z, rows, row_bytes, True, query_major, one_d)
    assert sorted(got) == [(b, z) for b in range(n_blk) for z in range(n_z)], "not a permutation"
    want, z0 = [], 0
    for size in sections:  # rank-major within each section of `size` elements
        for rank in range(n_blk):
            block = n_blk - 1 - rank if query_major else rank
            want += [(block, z0 + i) for i in range(size)]
        z0 += size
    assert got == want


@pytest.mark.parametrize("one_d", [False, True], ids=["2d", "1d"])
def test_plain_order_without_causal(schedule, one_d):
    got = _order(schedule, 3, 2, 8, 16, False, True, one_d)
    assert got == [(b, z) for z in range(2) for b in range(3)]  # blocks of element 0 first


# Causal problems with several 16-row blocks per head and 5 (or 4 = 2 GQA groups) heads: in
# float64 a head's 37 or 41 rows take 37·(8 + 8)·8 = 4736 or 5248 bytes, so an 11 kB budget
# makes sections of two heads (with 5, a short last one), 1 byte one head each, the default
# one section.
BUDGETS = {"one_head": 1, "two_heads": 11_000, "default": 50 * 2**20}


def _causal_inputs(gqa: bool, L: int = 37, S: int = 37):
    hq, hkv = (4, 2) if gqa else (5, 5)
    q = torch.randn(1, hq, L, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, hkv, S, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, hkv, S, 8, dtype=torch.float64, requires_grad=True)
    return (q, k, v), dict(is_causal=True, enable_gqa=gqa)


def _close(got, want):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-11)


def _forward_and_backward_match(prim, kw):
    """Checks the triton backend's output and gradients against the reference's; returns
    both as functions of (q, k, v)."""
    tri = functools.partial(theria.sdpa, backend="triton", **kw)
    ref = functools.partial(theria.sdpa, backend="reference", **kw)
    out = tri(*prim)
    _close([out], [ref(*prim)])
    do = torch.randn_like(out)
    _close(torch.autograd.grad(out, prim, do), torch.autograd.grad(ref(*prim), prim, do))
    return tri, ref


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("budget", list(BUDGETS), ids=str)
def test_first_order_in_sections_matches_reference(schedule, monkeypatch, budget, gqa):
    from theria.attention import triton_impl

    monkeypatch.setattr(schedule, "LPT_L2_BYTES", tl.constexpr(BUDGETS[budget]))
    prim, kw = _causal_inputs(gqa, L=37, S=41)
    tri, ref = _forward_and_backward_match(prim, kw)
    detached = tuple(x.detach() for x in prim)
    tangents = tuple(torch.randn_like(x) for x in prim)
    _, t_tri = torch.func.jvp(tri, detached, tangents)
    _, t_ref = torch.func.jvp(ref, detached, tangents)
    _close([t_tri], [t_ref])
    _, t_fused = triton_impl.sdpa_jvp(*detached, *tangents, scale=None, **kw)  # fused fwd+JVP
    _close([t_fused], [t_ref])


def _loss(backend: str, kw: dict):
    f = functools.partial(theria.sdpa, backend=backend, **kw)

    def loss(q, k, v):
        out = f(q, k, v)
        return (out.sin() * out).sum()

    return loss


@pytest.mark.parametrize("mode", ["rev_rev", "fwd_rev"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("budget", ["one_head", "two_heads"], ids=str)
def test_second_order_in_sections_matches_reference(schedule, monkeypatch, budget, gqa, mode):
    from theria import autodiff

    monkeypatch.setattr(schedule, "LPT_L2_BYTES", tl.constexpr(BUDGETS[budget]))
    prim, kw = _causal_inputs(gqa, L=41, S=37)
    u = tuple(torch.randn_like(x) for x in prim)
    got = autodiff.hvp(_loss("triton", kw), prim, u, mode)
    want = autodiff.hvp(_loss("reference", kw), prim, u, mode)
    _close(got, want)


@pytest.mark.parametrize(("L", "S"), [(1, 37), (37, 1), (1, 1)], ids=str)
def test_single_row_causal_grids(schedule, L, S):
    """L = 1 or S = 1: Triton passes an int argument equal to 1 as a constexpr, which the
    tile mapping must take as well as a tensor."""
    from theria import autodiff

    prim, kw = _causal_inputs(False, L=L, S=S)
    _forward_and_backward_match(prim, kw)
    u = tuple(torch.randn_like(x) for x in prim)
    _close(autodiff.hvp(_loss("triton", kw), prim, u, "rev_rev"),
           autodiff.hvp(_loss("reference", kw), prim, u, "rev_rev"))  # fmt: skip


def test_each_pass_orders_by_what_it_streams(schedule, monkeypatch):
    """Query-major passes (forward, JVPs, dQ, second-order row statistics and dQ̇) size their
    sections by the S keys they stream and start at the last query block; key-major passes
    (dK/dV, dK̇/dV̇) by the L queries, starting at the first key block. Recorded from the
    kernels' calls of the tile mapping (the interpreter runs them as Python)."""
    from theria import autodiff
    from theria.attention.kernels import first_order, second_order

    seen = set()

    def recording(original):
        def tile(*args):
            *head, row_bytes, causal, query_major = args
            seen.add((int(head[-1]), int(row_bytes), bool(causal), bool(query_major)))
            return original(*args)

        return tile

    monkeypatch.setattr(first_order, "grid_tile", recording(schedule.grid_tile))
    monkeypatch.setattr(second_order, "grid_block", recording(schedule.grid_block))
    prim, kw = _causal_inputs(False, L=37, S=41)
    u = tuple(torch.randn_like(x) for x in prim)
    for mode in ("rev_rev", "fwd_rev"):
        autodiff.hvp(_loss("triton", kw), prim, u, mode)
    # float64 rows of E = Ev = 8: 128 bytes; keys S = 41 for query-major, queries L = 37
    assert seen == {(41, 128, True, True), (37, 128, True, False)}
