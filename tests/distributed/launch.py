"""Starting a local multi-process job the way torchrun does (its five variables, 127.0.0.1
and a free port), without torchrun's agent: so that a failing rank must be ended by the
library's own error handling, not by the agent killing the others."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen
    out: str = ""
    err: str = ""

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode


def start(args: list[str], world: int, env: dict[str, str] | None = None) -> list[Rank]:
    """`python <args>` once per rank, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    port = str(free_port())
    ranks = []
    for r in range(world):
        e = os.environ | (env or {}) | {"RANK": str(r), "WORLD_SIZE": str(world),
             "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
        p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        ranks.append(Rank(r, p))
    return ranks


def wait(ranks: list[Rank], timeout_s: float) -> list[Rank]:
    """Waits for every rank; a rank still running after `timeout_s` (from now, in total) is
    killed and the call raises AssertionError: the job hung."""
    import time

    deadline = time.monotonic() + timeout_s
    hung = []
    for r in ranks:
        try:
            r.out, r.err = r.proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(r)
    for r in hung:
        r.proc.kill()
        r.out, r.err = r.proc.communicate()
    if hung:
        logs = "\n".join(f"--- rank {r.rank} stderr:\n{r.err[-3000:]}" for r in ranks)
        raise AssertionError(f"ranks {[r.rank for r in hung]} still running after "
                             f"{timeout_s:g} s (killed)\n{logs}")  # fmt: skip
    return ranks


def logs(ranks: list[Rank]) -> str:
    return "\n".join(f"--- rank {r.rank} (exit {r.returncode}):\n{r.out[-2000:]}\n"
                     f"{r.err[-4000:]}" for r in ranks)  # fmt: skip
