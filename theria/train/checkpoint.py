"""Atomic checkpoints and the random-number state that makes a resumed run continue exactly."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT = Path("checkpoints") / "last.pt"  # relative to a run directory


def rng_state() -> dict[str, Any]:
    """The global generators: torch (CPU and every CUDA device), numpy, Python's random."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes `state` to a temporary file next to `path`, flushes it to disk, then renames it
    over `path` (os.replace is atomic on POSIX): a crash leaves the old checkpoint or the new
    one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint` (it holds numpy/Python RNG states, hence
    weights_only=False: load only checkpoints you wrote)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def resolve_resume(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint to continue from, per the `resume` config value:
    null/false -> None (a fresh run); true -> <run_dir>/checkpoints/last.pt when it exists
    (else None: the first attempt of a job that may be requeued); a run directory -> its
    checkpoints/last.pt; a file -> that file. A named directory or file must exist."""
    if resume is None or resume is False or str(resume).lower() in ("false", "none", "null"):
        return None
    if resume is True or str(resume).lower() == "true":
        path = run_dir / CHECKPOINT
        return path if path.exists() else None
    target = Path(str(resume))
    path = target / CHECKPOINT if target.is_dir() else target
    if not path.is_file():
        raise FileNotFoundError(
            f"resume={resume!r}: no checkpoint at {path} (expected a run directory holding "
            f"{CHECKPOINT}, or a checkpoint file)"
        )
    return path
