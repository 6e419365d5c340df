"""The probe's honesty: the known CPU contract, and deliberately broken paths classified right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from theria.boundary import CAPABILITIES, Status, builtin_paths, parse_error, probe, run
from theria.boundary.probe import _make_inputs, explicit_composition

from .broken import analytic

F64 = torch.float64
FORWARD_MODE = ("forward_ad", "func_jvp", "fwd_rev_hvp", "hessian")


def _probe_builtin(name: str):
    (path,) = [p for p in builtin_paths() if p.name == name]
    return run("cpu", [F64], paths=[path], compile_paths=False)[0]


def test_default_sdpa_fails_double_backward_and_forward_ad_explicitly() -> None:
    r = _probe_builtin("sdpa default")
    assert r.status("forward") is Status.WORKS and r.results["forward"].rel_err < 1e-12
    assert r.status("vjp") is Status.WORKS
    db = r.results["double_backward"]
    assert db.status is Status.EXPLICIT
    assert db.op == "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    assert db.missing and "derivative" in db.missing
    fa = r.results["forward_ad"]
    assert fa.status is Status.EXPLICIT
    assert fa.op == "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert fa.missing and "forward-mode" in fa.missing
    assert r.status("maml") is Status.EXPLICIT  # loud, not a quiet FO-MAML


@pytest.mark.parametrize("name", ["sdpa math", "explicit", "theria reference", "theria torch"])
def test_differentiable_paths_work_in_every_mode(name: str) -> None:
    r = _probe_builtin(name)
    for cap in CAPABILITIES:
        c = r.results[cap]
        assert c.status is Status.WORKS, (cap, c)
        # float64 throughout: a few hundred unit roundoffs at most at L = S = 6, E = 16.
        assert c.rel_err < 1e-12, (cap, c.rel_err)


def test_unavailable_paths_are_not_failures() -> None:
    paths = [p for p in builtin_paths() if p.name in ("sdpa efficient", "sdpa cudnn")]
    for r in run("cpu", [F64], paths=paths, compile_paths=False):
        assert not r.available and r.reason
        assert all(r.status(c) is Status.UNAVAILABLE for c in CAPABILITIES)


def test_correct_but_jvp_less_function() -> None:
    r = probe(analytic("ok"), device="cpu", dtype=F64)
    for cap in ("forward", "vjp", "double_backward", "vmap", "maml"):
        assert r.status(cap) is Status.WORKS, (cap, r.results[cap])
    for cap in FORWARD_MODE:
        c = r.results[cap]
        assert c.status is Status.EXPLICIT, (cap, c)
    assert "jvp" in (r.results["forward_ad"].missing or "")


def test_detaching_backward_is_a_silent_failure() -> None:
    r = probe(analytic("detach"), device="cpu", dtype=F64)
    assert r.status("forward") is Status.WORKS
    assert r.status("vjp") is Status.WORKS  # first order is right: nothing looks wrong
    db = r.results["double_backward"]
    assert db.status is Status.SILENT and "no graph" in (db.detail or "")
    maml = r.results["maml"]
    assert maml.status is Status.SILENT and "FO-MAML" in (maml.detail or "")


def test_wrong_second_derivatives_are_a_silent_failure() -> None:
    r = probe(analytic("double"), device="cpu", dtype=F64)
    assert r.status("vjp") is Status.WORKS
    db = r.results["double_backward"]
    assert db.status is Status.SILENT and "wrong values" in (db.detail or "")
    assert db.rel_err > 0.1  # doubled second derivatives: an O(1) error
    maml = r.results["maml"]
    assert maml.status is Status.SILENT and "FO-MAML" not in (maml.detail or "")


def test_none_gradient_is_a_silent_failure() -> None:
    r = probe(analytic("drop_k"), device="cpu", dtype=F64, capabilities=("forward", "vjp"))
    assert r.status("forward") is Status.WORKS
    assert r.status("vjp") is Status.SILENT and "None for k" in (r.results["vjp"].detail or "")


def test_wrong_forward_values_are_a_silent_failure() -> None:
    def off_by_one_percent(q, k, v):
        return 1.01 * F.scaled_dot_product_attention(q, k, v)

    r = probe(off_by_one_percent, device="cpu", dtype=F64, capabilities=("forward",))
    c = r.results["forward"]
    assert c.status is Status.SILENT and abs(c.rel_err - 0.01) < 1e-9


def test_missing_kernel_is_unsupported_input() -> None:
    def no_double_kernel(q, k, v):
        if q.dtype == F64:
            raise RuntimeError("\"fancy_attention_cpu\" not implemented for 'Double'")
        return F.scaled_dot_product_attention(q, k, v)

    r = probe(no_double_kernel, device="cpu", dtype=F64)
    assert all(r.status(c) is Status.UNSUPPORTED for c in CAPABILITIES)
    r32 = probe(no_double_kernel, device="cpu", dtype=torch.float32, capabilities=("forward",))
    assert r32.status("forward") is Status.WORKS


def test_low_precision_is_measured_against_float64() -> None:
    r = probe(analytic("ok"), device="cpu", dtype=torch.bfloat16, capabilities=("forward", "vjp"))
    for cap in ("forward", "vjp"):
        c = r.results[cap]
        assert c.status is Status.WORKS
        assert 1e-5 < c.rel_err < 5e-2  # bf16 rounding is visible, and small


def test_oracle_agrees_with_math_sdpa() -> None:
    x = _make_inputs((1, 2, 6, 16), seed=0)
    want = F.scaled_dot_product_attention(x.q, x.k, x.v)
    torch.testing.assert_close(explicit_composition(x.q, x.k, x.v), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("message", "op", "missing"),
    [
        (
            "derivative for aten::_efficient_attention_backward is not implemented",
            "aten::_efficient_attention_backward",
            "the derivative of aten::_efficient_attention_backward",
        ),
        (
            "Trying to use forward AD with _flash_attention_forward that does not support it "
            "because it has not been implemented yet.",
            "aten::_flash_attention_forward",
            "the forward-mode derivative of aten::_flash_attention_forward",
        ),
        (
            "Batching rule not implemented for aten::_cudnn_attention_forward; the fallback path",
            "aten::_cudnn_attention_forward",
            "a vmap batching rule for aten::_cudnn_attention_forward",
        ),
        ("something else entirely", None, None),
    ],
)
def test_parse_error(message: str, op: str | None, missing: str | None) -> None:
    text, got_op, got_missing = parse_error(RuntimeError(message))
    assert text.startswith("RuntimeError: ")
    assert (got_op, got_missing) == (op, missing)


def test_probe_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capabilities"):
        probe(analytic("ok"), device="cpu", dtype=F64, capabilities=("telepathy",))
    with pytest.raises(ValueError, match="dtype"):
        probe(analytic("ok"), device="cpu", dtype=torch.int32)


def test_time_budget_reports_unprobed_paths() -> None:
    paths = [p for p in builtin_paths() if p.name in ("sdpa math", "theria torch")]
    results = run("cpu", [F64], paths=paths, time_budget=0.0)
    assert [r.name for r in results] == ["sdpa math", "theria torch"]  # nothing dropped
    assert all(not r.available and "time budget" in (r.reason or "") for r in results)
