"""Every experiment preset (conf/experiment/*.yaml) runs a few steps through the app."""

from __future__ import annotations

import json

import pytest

from tests.omniglot_data import require_omniglot
from theria.train import CONF_DIR, compose_config, train

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_a_few_steps(preset: str, tmp_path) -> None:
    small = ["debug=fast", "logger=none"]
    if preset == "exp_attn_paths":
        small.append("task.seq_len=64")  # the preset's L = 512 is for the measurement itself
    if preset.startswith("omniglot"):  # the real minimal sets (skips naming where it looked)
        small += [f"task.root={require_omniglot()}", "model.channels=8"]
    res = train(compose_config([f"experiment={preset}", *small]), run_dir=tmp_path)
    assert res["steps"] == 4
    test = json.loads((tmp_path / "results.json").read_text())["test"]["query_loss_post"]
    assert test["n"] == 8 and test["mean"] == test["mean"]  # finite, not NaN


def test_presets_exist() -> None:
    assert {"demo", "exp_sinusoid", "exp_transformer_algos", "exp_attn_paths"} <= set(PRESETS)
