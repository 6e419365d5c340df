"""The Hugging Face and override_sdpa paths of `python -m theria.boundary`, float64 on the CPU."""

import pytest
import torch

from theria.boundary import CAPABILITIES, Status, builtin_paths, run

NAMES = ("nn.TransformerEncoderLayer + override_sdpa", "hf eager", "hf sdpa", "hf theria")


@pytest.mark.slow
def test_hf_and_override_paths():
    paths = [p for p in builtin_paths() if p.name in NAMES]
    by_name = {r.name: r for r in run("cpu", [torch.float64], paths=paths, compile_paths=False)}
    assert set(by_name) == set(NAMES)
    for name in ("hf theria", "nn.TransformerEncoderLayer + override_sdpa"):
        for cap in CAPABILITIES:
            c = by_name[name].results[cap]
            assert c.status is Status.WORKS and c.rel_err < 1e-12, (name, cap, c)
    sdpa = by_name["hf sdpa"]
    assert sdpa.status("forward") is Status.WORKS
    for cap in ("double_backward", "forward_ad", "maml"):
        assert sdpa.status(cap) is Status.EXPLICIT, cap
    # Llama's eager attention takes the softmax in float32: in float64 it is silently only
    # float32-accurate (the probe's float64 tolerance is 1e-8)
    eager = by_name["hf eager"].results["double_backward"]
    assert eager.status is Status.SILENT and 1e-9 < eager.rel_err < 1e-5
