"""Starting a local multi-process job the way torchrun does (its five variables, 127.0.0.1
and a free port), without torchrun's agent: so that a failing rank must be ended by the
library's own error handling, not by the agent killing the others."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def python_path() -> str:
    """The repository root in front of the caller's PYTHONPATH (extended, never replaced:
    carried packages, e.g. on a GPU machine, stay importable in the workers)."""
    rest = os.environ.get("PYTHONPATH", "")
    return str(ROOT) + (os.pathsep + rest if rest else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Rank:
    rank: int
    proc: subprocess.Popen
    logs: Path  # this rank's stdout and stderr go to files (pipes could fill and block it)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def out(self) -> str:
        return (self.logs / f"rank{self.rank}.out").read_text()

    @property
    def err(self) -> str:
        return (self.logs / f"rank{self.rank}.err").read_text()


def start(args: list[str], world: int, env: dict[str, str] | None = None) -> list[Rank]:
    """`python <args>` once per rank, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    port = str(free_port())
    logs = Path(tempfile.mkdtemp(prefix="theria-ranks-"))
    ranks = []
    for r in range(world):
        e = os.environ | (env or {}) | {"RANK": str(r), "WORLD_SIZE": str(world),
             "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
             "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path()}  # fmt: skip
        with open(logs / f"rank{r}.out", "w") as out, open(logs / f"rank{r}.err", "w") as err:
            p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, stdout=out,
                                 stderr=err)  # fmt: skip
        ranks.append(Rank(r, p, logs))
    return ranks


def wait(ranks: list[Rank], timeout_s: float) -> list[Rank]:
    """Waits for every rank; a rank still running after `timeout_s` (from now, in total) is
    killed and the call raises AssertionError: the job hung."""
    deadline = time.monotonic() + timeout_s
    hung = []
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(r)
    for r in hung:
        r.proc.kill()
        r.proc.wait()
    if hung:
        logs = "\n".join(f"--- rank {r.rank} stderr:\n{r.err[-3000:]}" for r in ranks)
        raise AssertionError(f"ranks {[r.rank for r in hung]} still running after "
                             f"{timeout_s:g} s (killed)\n{logs}")  # fmt: skip
    return ranks


# A gloo rank occasionally aborts while the process exits, after all its work and the
# process-group teardown (2 of ~30 local 2-rank jobs on torch 2.14.1, never before the end of
# the job): C++ prints "terminate called without an active exception" and the exit status is
# -6/134. Upstream describes Gloo worker threads outliving the interpreter at exit
# (pytorch/pytorch#179291). A test accepts that exit only from a rank that reported its work
# complete; any other non-zero exit fails it.
EXIT_ABORT = "terminate called without an active exception"


def completed(returncode: int | None, err: str, finished: bool) -> bool:
    """Exit 0, or the known abort at exit after the rank `finished` its work."""
    return returncode == 0 or (finished and EXIT_ABORT in err)


def logs(ranks: list[Rank]) -> str:
    return "\n".join(f"--- rank {r.rank} (exit {r.returncode}):\n{r.out[-2000:]}\n"
                     f"{r.err[-4000:]}" for r in ranks)  # fmt: skip
