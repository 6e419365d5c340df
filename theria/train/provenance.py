"""Where and with what a run was made: versions, git commit, host, device, times
(results.json's `provenance`)."""

from __future__ import annotations

import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def _version(package: str) -> str | None:
    try:  # the installed distribution's version, without importing it (Triton is heavy)
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path = REPO) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the checkout theria runs from, or None outside a git work tree
    (an installed wheel) or without git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
        commit = commit.stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], check=True, capture_output=True,
                                text=True, timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def provenance(device: torch.device, started_at: str, wall_s: float) -> dict[str, Any]:
    """The record of results.json: versions of theria, torch, triton (None when absent) and
    CUDA (torch's build, None on a CPU build), git commit, host, device name, start/end (UTC,
    ISO 8601) and the wall time of the whole train() call."""
    import theria

    return {
        "theria": theria.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git": git_commit(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "started_at": started_at,
        "ended_at": now_iso(),
        "wall_time_s": wall_s,
    }
