"""theria.bench writes outside the committed tables by default, shows progress with an ETA,
and its Reproduce line carries every flag used (issue 18)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from theria.bench.common import DEFAULT_OUT, RESULTS_DIR

REPO = Path(__file__).resolve().parents[2]


def test_bench_cpu_writes_to_outputs_bench_with_progress_and_full_reproduce(tmp_path) -> None:
    committed = RESULTS_DIR / "hvp_cpu.md"
    before = hashlib.sha256(committed.read_bytes()).hexdigest()
    flags = ["--sizes", "32", "--batch", "1", "--heads", "1", "--dim", "8", "--repeats", "1",
             "--modes", "rev_rev"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "theria.bench", "cpu", *flags], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    written = tmp_path / DEFAULT_OUT / "hvp_cpu.md"
    assert written.is_file() and hashlib.sha256(committed.read_bytes()).hexdigest() == before
    assert "[bench cpu 1/3]" in out.stdout and "ETA" in out.stdout
    want = ("python -m theria.bench cpu --sizes 32 --batch 1 --heads 1 --dim 8 --repeats 1 "
            "--modes rev_rev")  # fmt: skip
    assert f"Reproduce: `{want}`" in written.read_text()
