"""Run directories that two runs cannot share.

Names. conf/config.yaml names a run `outputs/<name>/<date>_<time>_<run id>` and a sweep
`outputs/multirun/<name>/<date>_<time>_<run id>`; the run id is `THERIA_RUN_ID`, which
`python -m theria.train` sets to its process id before Hydra resolves the names (`set_run_id`).
Two processes alive at the same moment on one host have distinct ids, so two runs or sweeps of
one name started in the same second get distinct folders. Processes that the app starts inherit
the id (joblib workers, SLURM jobs through submitit): a sweep's jobs share its folder. Ranks of
one torchrun job take the torchrun agent's id (their parent), so they agree on rank 0's folder.

Claims. Names can still meet (hydra.run.dir given by hand, or two hosts writing to one shared
folder), so `claim` makes every run own its directory before any work: it creates
`<run dir>/.theria-run` exclusively (O_EXCL) holding `host pid`. A directory whose claim is
held by another live process on this host, or by a process on another host, is refused
(`RunDirInUseError`, a ConfigError: it names the directory, the owner and what to do).
A claim whose process is gone, or is this process (runs one after another in one Python
session), is taken over; so is another host's claim when `resume` asks to continue the run
(a requeued SLURM job on a new node).
"""

from __future__ import annotations

import errno
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from theria.train.build import ConfigError

CLAIM = ".theria-run"
RUN_ID = "THERIA_RUN_ID"


class RunDirInUseError(ConfigError):
    """Another run owns the run directory; raised before any work."""


def set_run_id() -> str:
    """Sets THERIA_RUN_ID (unless the environment already has one, e.g. from the process that
    launched this one): this process's id, or under torchrun (LOCAL_RANK set) the agent's."""
    if not os.environ.get(RUN_ID):
        os.environ[RUN_ID] = str(os.getppid() if "LOCAL_RANK" in os.environ else os.getpid())
    return os.environ[RUN_ID]


def default_run_dir(name: str) -> Path:
    """The folder of a run outside Hydra (train(cfg) without run_dir): outputs/<name>/<time>,
    to the microsecond and with the run id, so runs one after another in one process differ."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path("outputs") / name / f"{stamp}_{os.environ.get(RUN_ID) or os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _owner(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (FileNotFoundError, ValueError):
        return None


def claim(run_dir: Path, resume: Any = None) -> None:
    """Makes this process the owner of `run_dir` (see the module docstring), or raises
    RunDirInUseError before any work."""
    path, me = run_dir / CLAIM, (socket.gethostname(), os.getpid())
    resuming = resume is not None and str(resume).lower() not in ("false", "none", "null")
    for _ in range(3):  # a stale claim is removed, then the exclusive create is retried
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _owner(path)
            if owner is None or owner == me:
                path.unlink(missing_ok=True)  # torn or ours: take it over
                continue
            host, pid = owner
            if host == me[0] and not _alive(pid):
                path.unlink(missing_ok=True)  # its process is gone
                continue
            if host != me[0] and resuming:
                path.unlink(missing_ok=True)  # continuing a run from another host
                continue
            where = "" if host == me[0] else f" on host {host} (cannot check it from here)"
            raise RunDirInUseError(
                f"run directory {run_dir} belongs to another run: process {pid}{where} holds "
                f"{path}. Two runs must not share a directory (their checkpoints, results and "
                "TensorBoard files would mix): give this run another name= or hydra.run.dir"
                + ("" if host == me[0] else ", or resume=true to continue that run here")
                + f"; remove {path} if that run is gone"
            ) from None
        except OSError as e:  # pragma: no cover - read-only or exotic filesystems
            if e.errno in (errno.EROFS, errno.EACCES):
                raise ConfigError(f"run directory {run_dir} is not writable: {e}") from e
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"{me[0]} {me[1]}\n")
        return
    raise RunDirInUseError(f"run directory {run_dir}: could not claim {path} (runs racing for it)")
