"""Issue 16's benchmark plumbing, on the CPU: ratios to SDPA cuDNN, the targets evaluated from
a run's rows (met / NOT met / not measured, and the gap), the suites' defaults, the CUDA-only
suites refusing without CUDA, and the host-overhead suite end to end on the CPU."""

from __future__ import annotations

import pytest
import torch

from theria.bench import gpu, hvp, overhead
from theria.bench.__main__ import SUITES
from theria.bench.__main__ import main as bench_main
from theria.bench.common import ratios, target_cells


def _rec(mode: str, path: str, ms: float | None = None, **key) -> dict:
    """A gpu-suite record (causal, D, N default False, 64, 4096); no `ms` means it failed."""
    r = {"causal": False, "D": 64, "N": 4096, "mode": mode, "path": path, **key}
    return r | ({"ms": ms, "ms_min": ms, "peak_mb": 10.0} if ms is not None else {"error": "boom"})


# ------------------------------------------------------------------------------ common


def test_ratios_take_the_reference_of_the_same_group_and_mode() -> None:
    recs = [
        _rec("fwd", gpu.CUDNN, 2.0),
        _rec("fwd", gpu.THERIA, 3.0),
        _rec("fwd", gpu.THERIA, 5.0, N=1024),  # no cuDNN row at N=1024
        _rec("fwd+bwd", gpu.CUDNN, 4.0),
        _rec("fwd+bwd", gpu.THERIA, 2.0),
        _rec("fwd+bwd", gpu.FLASH),  # failed: no value, no ratio
        _rec("fwd+jvp", gpu.FUSED_JVP, 1.0),  # a mode without a reference
    ]
    got = ratios(recs, gpu.GROUP, gpu.X_CUDNN)
    assert got == [1.0, 1.5, None, 1.0, 0.5, None, None]
    # a reference in another mode (the HVP suite's `× cuDNN fwd+bwd`)
    got = ratios(recs, gpu.GROUP, {"fwd": ("fwd+bwd", gpu.CUDNN)})
    assert got[:3] == [0.5, 0.75, None]


def test_target_cells_verdict_and_gap() -> None:
    a, b = {"ms": 1.05}, {"ms": 1.0}
    assert target_cells(a, b, 1.1, 1.0) == [1.05, 1.0, "1.05", "1.1 (goal 1)", "-0.05 (goal +0.05)",
                                            "met"]  # fmt: skip
    assert target_cells({"ms": 1.6}, b, 1.5)[-2:] == ["+0.10", "NOT met"]
    assert target_cells({"ms": 1.5}, b, 1.5)[-1] == "met"  # the limit itself is met
    cells = target_cells(a, {"error": "RuntimeError: No available kernel"}, 1.1)
    assert cells[-1] == "not measured" and "No available kernel" in cells[2]
    cells = target_cells({"error": "OOM"}, b, 1.1)
    assert cells[-1] == "NOT met" and "OOM" in cells[2]
    assert target_cells(None, b, 1.1)[-1] == "NOT met"
    assert target_cells({"peak_mb": 30.0}, {"peak_mb": 10.0}, 3.0, field="peak_mb")[-1] == "met"
    assert target_cells({"peak_mb": 1.0}, {"peak_mb": 0.0}, 3.0, field="peak_mb")[-1] == (
        "not measured"
    )


# ------------------------------------------------------------------------------ gpu


def _first_order_run(jvpfa: bool = True) -> list[dict]:
    recs = []
    for causal in (False, True):
        for N, theria_ms in ((1024, 1.6), (2048, 1.0), (4096, 1.05), (16384, 1.2)):
            key = {"causal": causal, "N": N}
            recs += [_rec("fwd+bwd", gpu.THERIA, theria_ms, **key),
                     _rec("fwd+bwd", gpu.CUDNN, 1.0, **key),
                     _rec("fwd+bwd", gpu.FLASH, 2.0, **key),
                     _rec("fwd+jvp", gpu.FUSED_JVP, 0.25, **key),
                     _rec("fwd+jvp", gpu.FUNC_JVP, 0.4, **key)]  # fmt: skip
            if jvpfa:
                recs.append(_rec("fwd+jvp", gpu.JVPFA, 1.0, **key))
            if N == 1024:  # the calling-thread rows: only at one size
                recs += [_rec("fwd+bwd", gpu.THERIA_CT, 1.2, **key),
                         _rec("fwd+bwd", gpu.CUDNN_CT, 1.0, **key)]  # fmt: skip
    recs.append(_rec("fwd+bwd", gpu.THERIA, 9.0, D=96))  # not a target head dim
    recs.append(_rec("fwd+bwd", gpu.THERIA, 9.0, D=128))
    recs.append(_rec("fwd+bwd", gpu.CUDNN, None, D=128))  # cuDNN failed there
    return recs


def _by(rows: list[list]) -> dict[tuple, list]:
    return {(r[0], r[1], r[2], r[3]): r for r in rows}


def test_first_order_targets_from_rows() -> None:
    rows, summary = gpu.targets(_first_order_run())
    assert all(len(r) == len(gpu.TARGET_HEADERS) for r in rows)
    by = _by(rows)
    fb = "fwd+bwd theria.sdpa / SDPA cuDNN"
    for c in ("no", "yes"):
        assert by[(fb, c, 64, 4096)][-4:] == ["1.05", "1.1 (goal 1)", "-0.05 (goal +0.05)", "met"]
        assert by[(fb, c, 64, 16384)][-1] == "NOT met"
        assert by[(fb, c, 64, 16384)][-2] == "+0.10 (goal +0.20)"
        assert by[(fb, c, 64, 1024)][-4:] == ["1.60", "1.5", "+0.10", "NOT met"]
        assert (fb, c, 64, 2048) not in by  # 1024 < N < 4096: no target
        ct = by[("fwd+bwd, both calling-thread backward", c, 64, 1024)]
        assert ct[-4:] == ["1.20", "1.5", "-0.30", "met"]
        assert ("fwd+bwd, both calling-thread backward", c, 64, 4096) not in by  # no such rows
        # the JVP target applies from N = 4096 (gpu.JVP_MIN_N), not at 1024 or 2048
        jvp = "fwd+jvp fused sdpa_jvp / jvp-flash-attention"
        assert (jvp, c, 64, 2048) not in by and (jvp, c, 64, 1024) not in by
        assert by[(jvp, c, 64, 4096)][-4:] == ["0.25", "0.3", "-0.05", "met"]
        func = by[("fwd+jvp torch.func.jvp / jvp-flash-attention", c, 64, 16384)]
        assert func[-1] == "NOT met"
    assert by[(fb, "no", 128, 4096)][-1] == "not measured"
    assert not any(r[2] == 96 for r in rows)
    # per causal: fwd+bwd at 1024, 4096, 16384, the calling-thread row at 1024 and 2 JVP rows
    # at each of 4096 and 16384; D=128: 1
    assert len(rows) == 2 * (3 + 1 + 4) + 1
    met = 2 * (1 + 1 + 2)  # fwd+bwd at 4096, calling-thread at 1024, fused JVP at 4096, 16384
    assert summary.startswith(f"Issue 16 targets in this run: {met} met, {len(rows) - met - 1} "
                              "NOT met, 1 not measured")  # fmt: skip


def test_first_order_jvp_targets_need_jvp_flash_attention() -> None:
    rows, summary = gpu.targets(_first_order_run(jvpfa=False))
    assert not any(r[0].startswith("fwd+jvp") for r in rows)
    assert "jvp-flash-attention is not installed" in summary
    rows, summary = gpu.targets([_rec("fwd", gpu.THERIA, 1.0, N=2048)])
    assert rows == [] and "none in this run" in summary


def test_first_order_table_columns() -> None:
    recs = [
        _rec("fwd+bwd", gpu.CUDNN, 1.0, causal=True),
        _rec("fwd+bwd", gpu.FLASH, 2.0, causal=True),
        _rec("fwd+bwd", gpu.THERIA, 3.0, causal=True),
        _rec("fwd+bwd", gpu.EFFICIENT, causal=True),
        _rec("fwd+jvp", gpu.FUSED_JVP, 1.0, causal=True),
        _rec("fwd+jvp", gpu.JVPFA, 4.0, causal=True),
    ]
    lines = gpu.timings_table(recs).splitlines()
    assert lines[0].split("|")[-3:-1] == [" × cuDNN ", " × peer "]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[-2:] for c in cells] == [["1.00", "0.50"], ["2.00", "1.00"], ["3.00", "1.50"],
                                       ["", ""], ["", "0.25"], ["", "1.00"]]  # fmt: skip
    assert cells[3][5] == "boom" and cells[0][0] == "yes"
    # causal halves the FLOPs: 7 matmuls of 2·2·16·4096²·64, halved, in 1 ms
    assert float(cells[0][6]) == pytest.approx(
        gpu.flops(7, 2, 16, 4096, 64) / 2 / 1e-3 / 1e12, rel=1e-2
    )


def test_gpu_defaults() -> None:
    args = gpu._parser().parse_args([])
    assert args.sizes == [256, 1024, 4096, 16384] and args.dims == [64, 128]
    assert args.causal == ["no", "yes"] and args.modes == ["fwd", "fwd+bwd", "fwd+jvp"]
    assert args.name == "triton_first_order_cuda" and "h100" not in args.name
    assert gpu._parser().parse_args(["--causal", "yes"]).causal == ["yes"]
    with pytest.raises(SystemExit):
        gpu._parser().parse_args(["--causal", "maybe"])


# ------------------------------------------------------------------------------ hvp


def _h(mode: str, path: str, ms: float | None, peak: float = 10.0, **key) -> dict:
    r = {"causal": False, "D": 64, "dtype": "bf16", "N": 4096, "mode": mode, "path": path, **key}
    return r | ({"ms": ms, "ms_min": ms, "peak_mb": peak} if ms is not None else {"error": "OOM"})


def test_hvp_targets_from_rows() -> None:
    recs = []
    for D, rev_rev in ((64, 4.2), (128, 4.8)):
        recs += [_h("fwd+bwd", hvp.CUDNN, 1.0, D=D), _h("fwd+bwd", hvp.FLASH, 1.1, D=D),
                 _h("rev_rev", hvp.THERIA, rev_rev, peak=25.0, D=D),
                 _h("fwd_rev", hvp.THERIA, 4.4, peak=35.0, D=D),
                 _h("rev_rev", "SDPA math", 40.0, D=D)]  # fmt: skip
    recs += [_h("rev_rev", hvp.THERIA, 9.0, N=2048), _h("fwd+bwd", hvp.CUDNN, 1.0, N=2048)]
    recs += [_h("rev_rev", hvp.THERIA, 9.0, dtype="fp32"), _h("fwd+bwd", hvp.CUDNN, None,
                                                             dtype="fp32")]  # fmt: skip
    recs += [_h("rev_rev", hvp.THERIA, None, causal=True, N=32768),
             _h("fwd+bwd", hvp.CUDNN, 50.0, causal=True, N=32768)]  # fmt: skip
    rows, summary = hvp.targets(recs)
    assert all(len(r) == len(hvp.TARGET_HEADERS) for r in rows)
    by = {(r[0], r[1], r[2], r[4]): r for r in rows}
    rr, fr = "rev_rev ms / SDPA cuDNN fwd+bwd ms", "fwd_rev ms / rev_rev ms"
    assert by[(rr, "no", 64, 4096)][-4:] == ["4.20", "4.5 (goal 4)", "-0.30 (goal +0.20)", "met"]
    assert by[(rr, "no", 128, 4096)][-4:] == ["4.80", "4.5 (goal 4)", "+0.30 (goal +0.80)",
                                              "NOT met"]  # fmt: skip
    assert by[(fr, "no", 64, 4096)][-2:] == ["+0.05", "NOT met"]  # 4.4 > 4.2
    assert by[(fr, "no", 128, 4096)][-2:] == ["-0.08", "met"]  # 4.4 < 4.8
    peak = "rev_rev peak MB / SDPA flash fwd+bwd peak MB"
    assert by[(peak, "no", 64, 4096)][-1] == "met"  # 25 / 10 <= 3
    assert by[("fwd_rev peak MB / SDPA flash fwd+bwd peak MB", "no", 64, 4096)][-1] == "NOT met"
    assert by[(rr, "yes", 64, 32768)][-1] == "NOT met"  # theria ran out of memory
    assert not any(r[4] == 2048 or r[3] == "fp32" for r in rows)  # N < 4096, float32
    assert "Issue 16 HVP targets in this run:" in summary
    assert hvp.targets([_h("rev_rev", hvp.THERIA, 1.0, N=1024)])[0] == []


def test_hvp_table_ratio_to_cudnn_and_defaults() -> None:
    recs = [_h("fwd+bwd", hvp.CUDNN, 2.0), _h("rev_rev", hvp.THERIA, 9.0),
            _h("rev_rev", hvp.THERIA, 9.0, causal=True)]  # fmt: skip
    cells = [[c.strip() for c in line.strip("|").split("|")]
             for line in hvp.timings_table(recs, 2, 16).splitlines()[2:]]  # fmt: skip
    assert [c[-1] for c in cells] == ["1.00", "4.50", ""]  # no cuDNN row for causal
    args = hvp._parser().parse_args([])
    assert args.causal == ["no", "yes"] and args.name == "triton_hvp_cuda"
    assert args.modes == ["rev_rev", "fwd_rev"] and not args.no_check and not args.sweep


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("suite", [gpu, hvp, overhead])
def test_cuda_suites_refuse_without_cuda(suite, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        suite.main(["--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


# ------------------------------------------------------------------------------ overhead


def test_overhead_defaults_and_registration() -> None:
    assert "overhead" in SUITES
    args = overhead._parser().parse_args([])
    assert args.device == "cuda" and args.dtype == "bf16" and args.dim == 64
    assert (args.batch, args.heads, args.size) == (1, 1, 16) and args.calls == 200
    assert args.modes == list(overhead.MODES)


def test_overhead_suite_runs_on_the_cpu(tmp_path) -> None:
    bench_main(["overhead", "--device", "cpu", "--dtype", "fp32", "--calls", "2", "--rounds",
                "1", "--warmup", "1", "--out", str(tmp_path), "--name", "o"])  # fmt: skip
    text = (tmp_path / "o.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(overhead.HEADERS) and cells[0] in overhead.MODES:
            rows[(cells[0], cells[1])] = cells
    want = {(m, "theria.sdpa torch") for m in overhead.MODES}
    want |= {("fwd", "SDPA default"), ("fwd+bwd", "SDPA default")}
    want |= {(m, "SDPA math") for m in ("fwd+jvp", "rev_rev", "fwd_rev")}
    want |= {("fwd_rev", "theria.sdpa torch, torch.func jvp of grad")}  # torch.func's route
    assert set(rows) == want  # the CPU has no cuDNN, kernels-only or fused-JVP rows
    for (mode, path), cells in rows.items():
        assert float(cells[2]) > 0 and float(cells[3]) >= 0, (mode, path, cells)
        assert cells[4] == ""  # no GPU time on the CPU
        if path == overhead.REFERENCE[mode]:
            assert cells[5] == "1.00"
    assert "Reproduce: `python -m theria.bench overhead --device cpu --dtype fp32" in text


def test_same_dtype_yardstick_is_sdpa_in_that_dtype() -> None:
    """The 2× rule's peer: equal to PyTorch's SDPA in float64 (masks, causal, GQA), and in
    bf16 computed in bf16 (its error above that of theria's upcasting reference backend)."""
    import torch.nn.functional as F

    import theria
    from theria.bench.common import same_dtype_sdpa

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 33, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    m = torch.rand(33, 40, generator=g) > 0.3
    for kw in ({}, {"is_causal": True}, {"attn_mask": m}):
        got = same_dtype_sdpa(q, k, v, enable_gqa=True, **kw)
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    x = [t.bfloat16() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    low = same_dtype_sdpa(*x, enable_gqa=True)
    up = theria.sdpa(*x, enable_gqa=True, backend="reference")
    assert low.dtype == torch.bfloat16
    assert (low.double() - exact).abs().max() > (up.double() - exact).abs().max()
