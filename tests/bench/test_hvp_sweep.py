"""`python -m theria.bench hvp --sweep`'s bookkeeping, through Triton's interpreter: each HVP
form (rev_rev's double backward, fwd_rev's dO tangent) keeps its own fastest tile, in its own
table, and a form none of whose tiles ran keeps the entry it had. The timings are stand-ins
(the interpreter's tiles are fixed); the kernels themselves run."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.triton_interpret

A, B = (16, 32, 4, 2, True), (32, 32, 4, 2, True)  # dK̇/dV̇ candidates
C, D = (32, 16, 4, 2, False), (64, 16, 4, 2, False)  # dQ̇
E, F = (64, 32, 4, 2, False), (32, 16, 4, 2, False)  # row statistics
FASTEST = {False: {"dkdv": B, "dq": C, "rowstats": F}, True: {"dkdv": A}}


def test_each_form_keeps_its_fastest_tile(monkeypatch) -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=1 was not set before Triton was imported")
    from theria.attention.kernels import second_order as so
    from theria.bench import hvp

    for name in so.CONFIGS:  # restored after the test: set_config edits these in place
        monkeypatch.setitem(so.CONFIGS, name, dict(so.CONFIGS[name]))
    monkeypatch.setattr(so, "CONFIGS_TDO", {})
    monkeypatch.setattr(hvp, "SWEEP", {"dkdv": [A, B], "dq": [C, D], "rowstats": [E, F]})
    calls: list[bool] = []  # per backward_jvp call: was a dO tangent given
    real = so.backward_jvp

    def recording(*args):
        calls.append(len(args) > 11 and args[11] is not None)
        if calls.count(calls[-1]) == 1:  # the kernels run once per form (the interpreter is slow)
            return real(*args)
        return None

    def fake_measure(fn, device, repeats, warmup):
        fn()
        tdo = calls[-1]
        tables = {
            k: {**so.CONFIGS[k], **(so.CONFIGS_TDO.get(k, {}) if tdo else {})} for k in so.CONFIGS
        }
        if tdo and tables["dq"][64] in (C, D):  # every dQ̇ tile of the fwd_rev form fails
            raise RuntimeError("does not compile")
        ms = 1.0 + sum(tables[k][64] != cfg for k, cfg in FASTEST[tdo].items())
        return {"ms": ms, "ms_min": ms, "peak_mb": 0.0}

    monkeypatch.setattr(so, "backward_jvp", recording)
    monkeypatch.setattr(hvp, "measure", fake_measure)
    report = hvp.sweep(torch.device("cpu"), [16], N=16, dtype=torch.float32)

    assert so.CONFIGS["dkdv"][64] == B and so.CONFIGS["dq"][64] == C
    assert so.CONFIGS["rowstats"][64] == F
    assert so.CONFIGS_TDO["dkdv"][64] == A  # the dO-tangent form chose differently
    assert 64 not in so.CONFIGS_TDO.get("dq", {})  # no tile ran: it falls back to CONFIGS
    assert set(calls) == {False, True}
    assert "fails: RuntimeError" in report and "(not run)" in report  # rowstats: rev only
    assert "CONFIGS_TDO['dkdv'][64] = (16, 32, 4, 2, True)" in report
    assert "CONFIGS_TDO['dq'][64] = no entry (no tile ran: CONFIGS serves it)" in report
    # --sweep-kernels: only the kernels asked for are timed
    report = hvp.sweep(torch.device("cpu"), [16], N=16, dtype=torch.float32, kernels=["rowstats"])
    assert "| rowstats |" in report and "| dkdv |" not in report and "| dq |" not in report
