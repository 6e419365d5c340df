"""The peak memory of one run, meaning what it says.

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`), reset when the meter
starts, so a job of a sweep in the same process never inherits the previous job's peak.
CPU: the resident set size (RSS, /proc/self/statm) sampled every `interval_s` by a daemon
thread while the run's steps execute, minus the RSS when the meter started: the memory this
run's steps added on top of torch's own baseline (~1 GB of libraries) and of whatever earlier
jobs of the sweep left allocated. `ru_maxrss`, the process's lifetime peak, says neither.
A sampled peak can miss a spike shorter than the interval (it is a lower bound).
"""

from __future__ import annotations

import os
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """The process's resident set now, in MB of 2^20 bytes (Linux /proc; else ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:  # not Linux: the lifetime peak is all there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


class PeakMemory:
    """`start()`, then `peak_mb()` at any time (this run's peak so far), `stop()` at the end.
    `kind` names what is measured (results.json's `peak_mem_kind`)."""

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.start_mb = 0.0
        self._max = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kind = ("cuda_allocator_peak" if device.type == "cuda"
                     else "cpu_rss_peak_above_start_sampled")  # fmt: skip

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.start_mb = self._max = rss_mb()
        self._thread = threading.Thread(target=self._sample, name="theria-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, rss_mb())

    def peak_mb(self) -> float:
        """CUDA: the allocator's peak since `start`; CPU: max sampled RSS − RSS at `start`."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._max = max(self._max, rss_mb())
        return self._max - self.start_mb

    def stop(self) -> float:
        peak = self.peak_mb()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return peak
