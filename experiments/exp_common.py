"""Helpers shared by the experiment scripts: where results go, markdown tables, the scale line
every committed table carries, and running theria.train jobs in parallel processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu}{gpu}, torch {torch.__version__}, {when}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pm(mean: float, ci: float, digits: int = 3) -> str:
    return f"{mean:.{digits}g} ± {ci:.2g}"


def run_train(overrides: Sequence[str], timeout: float | None = None) -> None:
    """`python -m theria.train <overrides>` in a fresh process (clean peak-memory readings);
    raises with its stderr's tail when it fails."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "theria.train", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"theria.train {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
