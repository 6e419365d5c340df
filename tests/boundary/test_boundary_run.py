"""The full sweep over every built-in path, compiled variants included (slow: torch.compile)."""

from __future__ import annotations

import pytest
import torch

from theria.boundary import CAPABILITIES, Status, builtin_paths, run


@pytest.mark.slow
def test_full_cpu_run_classifies_every_path() -> None:
    results = run("cpu")
    by_name = {r.name: r for r in results}
    eager = [p.name for p in builtin_paths()]
    assert list(by_name)[: len(eager)] == eager
    for r in results:
        if r.available:
            assert set(r.results) == set(CAPABILITIES), r.name
    # The known CPU contract (torch's fused CPU kernel has no second or forward-mode derivative).
    for name in ("sdpa default", "sdpa flash", "cpu flash op", "nn.MultiheadAttention"):
        assert by_name[name].status("double_backward") is Status.EXPLICIT, name
        assert by_name[name].status("forward_ad") is Status.EXPLICIT, name
    # Compiled variants exist exactly for the paths whose eager double backward works.
    works = [r.name for r in results[: len(eager)] if r.status("double_backward") is Status.WORKS]
    assert {"sdpa math", "explicit", "theria reference", "theria torch"} <= set(works)
    compiled = [r.name for r in results[len(eager) :]]
    assert compiled == [f"compile({n})" for n in works]
    # theria's blockwise Functions keep every derivative exact under torch.compile.
    for cap in CAPABILITIES:
        c = by_name["compile(theria torch)"].results[cap]
        assert c.status is Status.WORKS and c.rel_err < 1e-12, (cap, c)


@pytest.mark.slow
def test_float32_sweep_without_compile() -> None:
    results = run("cpu", [torch.float32], compile_paths=False)
    for r in results:
        if r.name in ("sdpa math", "theria torch", "theria reference"):
            assert all(r.status(c) is Status.WORKS for c in CAPABILITIES), r.name
