"""Atomic checkpoints and the random-number state that makes a resumed run continue exactly.

A checkpoint holds only finite parameters and optimizer state (`faults.check_state`), so "the
last checkpoint" is always one a run can continue from. A write interrupted by a kill leaves a
`.last.pt.tmp-<pid>` next to it; the next save or load in that folder removes it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from theria.train.faults import check_state

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Removes the `.<name>.tmp-<pid>` files next to `path` that a killed writer left (its pid
    no longer runs, or it is this process's own from an earlier attempt); returns them."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or (int(pid) != os.getpid() and _alive(int(pid))):
            continue  # another live process may be writing it
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes `state` to a temporary file next to `path`, flushes it to disk, then renames it
    over `path` (os.replace is atomic on POSIX): a crash leaves the old checkpoint or the new
    one, never a torn file. A state with non-finite parameters or optimizer state is refused
    (NonFiniteLossError) and the old checkpoint kept."""
    check_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by `save_checkpoint` (it holds numpy/Python RNG states, hence
    weights_only=False: load only checkpoints you wrote)."""
    remove_stale_temporaries(path)
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
