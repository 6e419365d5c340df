"""experiments/hf_hvp.py (the GPU measurement) runs end to end at tiny sizes on the CPU."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "hf_hvp.py"


@pytest.mark.slow
def test_hf_hvp_script_small_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_hvp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "hf_hvp.md"
    text = module.main(["--device", "cpu", "--small", "--lengths", "16", "--repeats", "1",
                        "--out", str(out)])  # fmt: skip
    assert out.read_text() == text
    assert "failed:" not in text  # every section ran
    for line in ("| 16 | rev_rev | theria |", "| 16 | fwd_rev | eager |", "| theria |"):
        assert line in text
    # PyTorch's fused CPU kernel cannot be differentiated twice: its rows say so
    assert "| 16 | rev_rev | sdpa | raises | RuntimeError: derivative for" in text
    assert text.count("| yes |") == 2  # bfloat16 and float32 within the 2x rule
    assert "transformers: " in text and "device: CPU" in text
