"""`theria.attention.kernels.precision`: the float32 dot scheme per head width and the
environment switch that measures other schemes (no Triton needed)."""

from __future__ import annotations

import pytest
import torch

from theria.attention import kernels


def test_default_schemes_per_dtype_and_width() -> None:
    assert kernels.precision(torch.float64, 64) == "ieee"
    assert kernels.precision(torch.bfloat16, 128) == "tf32"  # unused for 16-bit operands
    if kernels._FP32_DOTS == ("tf32x3", "bf16x6"):  # not overridden, not the interpreter
        assert kernels.precision(torch.float32, 64) == "tf32x3"
        assert kernels.precision(torch.float32, 128) == "bf16x6"


def test_defaults_without_overrides(monkeypatch) -> None:
    for name in ("THERIA_FP32_DOTS", "THERIA_FP32_WIDE_DOTS", "TRITON_INTERPRET"):
        monkeypatch.delenv(name, raising=False)
    assert kernels._fp32_dots() == ("tf32x3", "bf16x6")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # numpy dots: the option is moot there
    assert kernels._fp32_dots() == ("tf32x3", "tf32x3")


def test_environment_switch_is_validated(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("THERIA_FP32_DOTS", "bf16x6")
    monkeypatch.setenv("THERIA_FP32_WIDE_DOTS", "bf16x6")
    assert kernels._fp32_dots() == ("bf16x6", "bf16x6")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter accepts tf32x3 and ieee only
    assert kernels._fp32_dots() == ("tf32x3", "tf32x3")
    monkeypatch.setenv("THERIA_FP32_DOTS", "tf32")
    with pytest.raises(ValueError, match=r"THERIA_FP32_DOTS='tf32': expected one of"):
        kernels._fp32_dots()
