"""Reports, the failure contract, the generated CONTRACT.md section and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

from theria.boundary import Status, builtin_paths, contract_sentences, probe, run, to_json
from theria.boundary import to_markdown as md
from theria.boundary.__main__ import main
from theria.boundary.report import update_contract

from .broken import analytic

CONTRACT_RE = re.compile(
    r"^Given Q, K, V, path `[^`]+` \([\w, ]+\) does not expose .+, "
    r"therefore .+ cannot be computed\.$"
)


@pytest.fixture(scope="module")
def results():
    paths = [p for p in builtin_paths() if p.name in ("sdpa default", "sdpa efficient")]
    rs = run("cpu", [torch.float64], paths=paths, compile_paths=False)
    rs.append(probe(analytic("detach"), device="cpu", dtype=torch.float64, name="detaching"))
    return rs


def test_contract_has_one_sentence_per_broken_path(results) -> None:
    sentences = contract_sentences(results)
    assert len(sentences) == 2  # sdpa default and detaching; the unavailable path is not broken
    for s in sentences:
        assert CONTRACT_RE.match(s), s
    default, detaching = sentences
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in default
    assert "second-order MAML meta-gradient" in default
    assert "silently" in detaching and "FO-MAML" in detaching


def test_markdown_and_json(results) -> None:
    env = {"date": "today", "torch": torch.__version__, "device": "CPU"}
    text = md(results, env)
    assert "| sdpa default | ✓" in text and "✗ raises" in text and "⚠ SILENT" in text
    assert "`sdpa efficient`: PyTorch has no CPU kernel" in text
    payload = json.loads(to_json(results, env))
    by_name = {r["name"]: r for r in payload["results"]}
    assert by_name["sdpa default"]["results"]["double_backward"]["status"] == "explicit failure"
    assert by_name["detaching"]["results"]["maml"]["status"] == Status.SILENT.value
    assert by_name["sdpa efficient"]["available"] is False
    assert payload["contract"] == contract_sentences(results)


def test_update_contract_touches_only_its_section(tmp_path) -> None:
    f = tmp_path / "CONTRACT.md"
    update_contract(f, "cpu", "CPU TABLE 1")
    text = f.read_text()
    assert "## Derivative support (generated)" in text and "CPU TABLE 1" in text
    assert "<!-- boundary:gpu:begin -->\n_Pending" in text  # placeholder until the GPU run
    f.write_text("# Contract\n\nhand-written rules\n\n" + text + "\nafter the section\n")
    update_contract(f, "gpu", "GPU TABLE")
    update_contract(f, "cpu", "CPU TABLE 2")
    text = f.read_text()
    assert text.startswith("# Contract\n\nhand-written rules\n")
    assert text.rstrip().endswith("after the section")
    assert "CPU TABLE 2" in text and "CPU TABLE 1" not in text and "GPU TABLE" in text
    assert text.count("## Derivative support (generated)") == 1
    with pytest.raises(ValueError, match="section"):
        update_contract(f, "tpu", "x")


def test_cli(tmp_path, capsys) -> None:
    out_md, out_json, contract = tmp_path / "r.md", tmp_path / "r.json", tmp_path / "C.md"
    rc = main(
        ["--only", "sdpa default", "theria torch", "--no-compile", "-q", "--markdown",
         str(out_md), "--json", str(out_json), "--update-contract", str(contract)]
    )  # fmt: skip
    assert rc == 0
    assert "| theria torch | ✓" in capsys.readouterr().out
    names = [r["name"] for r in json.loads(out_json.read_text())["results"]]
    assert names == ["sdpa default", "theria torch"]
    assert "Failure contract" in out_md.read_text()
    assert "| sdpa default |" in contract.read_text().split("boundary:cpu:end")[0]
    with pytest.raises(SystemExit):
        main(["--only", "no such path"])
    # A saved run (e.g. from the GPU machine) renders the same report and contract section.
    out_md2, contract2 = tmp_path / "r2.md", tmp_path / "C2.md"
    args = ["--from-json", str(out_json), "--markdown", str(out_md2), "--section", "gpu"]
    assert main([*args, "--update-contract", str(contract2)]) == 0
    assert out_md2.read_text() == out_md.read_text()
    gpu = contract2.read_text().split("boundary:gpu:begin")[1]
    assert "| sdpa default |" in gpu and "Pending" not in gpu


def test_import_is_cheap() -> None:
    import subprocess
    import sys

    code = (
        "import sys, theria.boundary; "
        "print([m for m in ('triton', 'torch._inductor') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
