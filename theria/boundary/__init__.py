"""Boundary analysis: which attention paths support which derivatives, here, and how they fail.

    from theria import boundary
    r = boundary.probe(my_attn, device="cpu", dtype=torch.float64)   # any (q, k, v) -> out
    r.status("double_backward")          # Status.WORKS / EXPLICIT / SILENT / UNSUPPORTED
    results = boundary.run(device="cpu")  # every built-in path (SDPA backends, FlexAttention,
                                          # nn modules, theria backends, torch.compile'd ones)

    python -m theria.boundary [--device cpu|cuda] [--dtype float64 ...] [--json FILE]
                              [--markdown FILE] [--update-contract docs/CONTRACT.md --section cpu]

Importing this module is cheap: nothing is compiled until `run` probes a compiled path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import torch

from theria.boundary.paths import Path, builtin_paths, compiled
from theria.boundary.probe import (
    CAPABILITIES,
    CapResult,
    ProbeResult,
    Status,
    Unavailable,
    _mark_unsupported,
    parse_error,
    probe,
)
from theria.boundary.report import contract_sentences, environment, to_json, to_markdown

__all__ = [
    "CAPABILITIES",
    "CapResult",
    "Path",
    "ProbeResult",
    "Status",
    "Unavailable",
    "builtin_paths",
    "contract_sentences",
    "environment",
    "probe",
    "run",
    "to_json",
    "to_markdown",
]

DEFAULT_DTYPES = {"cpu": (torch.float64,), "cuda": (torch.float32, torch.bfloat16)}


@contextlib.contextmanager
def _compile_settings() -> Iterator[None]:
    """Each capability may recompile (grad mode, dual tensors, functorch levels); a path that
    hit Dynamo's recompile limit would silently run eagerly and be reported as compiled. Raise
    the limit, and make hitting it an error rather than a quiet fallback."""
    import torch._dynamo.config as dynamo_config

    wanted = {"recompile_limit": 64, "cache_size_limit": 64, "fail_on_recompile_limit_hit": True}
    present = {k: v for k, v in wanted.items() if hasattr(dynamo_config, k)}
    with dynamo_config.patch(**present):
        yield


def _probe_path(
    path: Path, device: torch.device, dtype: torch.dtype, fresh: bool = False
) -> ProbeResult:
    """Probe one path. ``fresh``: build the path anew for every capability (compiled paths:
    what a compiled function does under double backward depends on which graphs it compiled
    before, so each capability is probed as the first use of a fresh compile)."""
    t0 = time.perf_counter()
    result = ProbeResult(path.name, str(device), str(dtype)[6:])
    for caps in [(c,) for c in CAPABILITIES] if fresh else [CAPABILITIES]:
        try:
            fn, ref = path.make(device, dtype)
        except Unavailable as e:
            return ProbeResult(
                path.name, str(device), str(dtype)[6:], available=False, reason=str(e)
            )
        except Exception as e:  # a path that crashes while being built is a result
            text, op, missing = parse_error(e)
            for c in caps:
                result.results[c] = CapResult(
                    c, Status.EXPLICIT, error=text, op=op, missing=missing
                )
            continue
        r = probe(fn, device=device, dtype=dtype, name=path.name, reference=ref, capabilities=caps)
        result.results.update(r.results)
    _mark_unsupported(result)
    result.seconds = time.perf_counter() - t0
    return result


def run(
    device: torch.device | str = "cpu",
    dtypes: Sequence[torch.dtype] | None = None,
    paths: Sequence[Path] | None = None,
    compile_paths: bool = True,
    compile_dtypes: Sequence[torch.dtype] | None = None,
    verbose: bool = False,
    time_budget: float | None = None,
) -> list[ProbeResult]:
    """Probe every path at every dtype on ``device``.

    Args:
        dtypes: defaults to (float64,) on the CPU and (float32, bfloat16) on CUDA.
        paths: defaults to `builtin_paths()`.
        compile_paths: also probe ``torch.compile`` of each path whose eager form supports
            double backward (PyTorch warns that compiled double backward can be silently
            wrong), at ``compile_dtypes`` (default: the first dtype only, to bound compile
            time).
        verbose: print one progress line per path on stderr.
        time_budget: seconds; paths not started within it are reported as unavailable with
            the reason "not probed: time budget exhausted" (never dropped from the report).
    Returns:
        One `ProbeResult` per (path, dtype), eager paths first, then compiled ones.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run: device {device} requested but torch.cuda.is_available() is False")
    dtypes = tuple(dtypes or DEFAULT_DTYPES.get(device.type, (torch.float32,)))
    compile_dtypes = tuple(compile_dtypes or dtypes[:1])
    paths = list(paths or builtin_paths())
    results: list[ProbeResult] = []
    t0 = time.perf_counter()

    def probe_or_skip(path: Path, dtype: torch.dtype, fresh: bool = False) -> None:
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            why = f"not probed: the time budget of {time_budget:g} s was exhausted"
            r = ProbeResult(path.name, str(device), str(dtype)[6:], available=False, reason=why)
        else:
            r = _probe_path(path, device, dtype, fresh=fresh)
        results.append(r)
        if verbose:
            _print_progress(r)

    for dtype in dtypes:
        for path in paths:
            probe_or_skip(path, dtype)
    if compile_paths:
        eager = {(r.name, r.dtype): r for r in results}
        with _compile_settings():
            for dtype in compile_dtypes:
                for path in paths:
                    r = eager.get((path.name, str(dtype)[6:]))
                    if r is None or r.status("double_backward") is not Status.WORKS:
                        continue
                    probe_or_skip(compiled(path), dtype, fresh=True)
    return results


def _print_progress(r: ProbeResult) -> None:
    import sys

    cells = "unavailable" if not r.available else ", ".join(
        f"{c}: {x.status.value}" for c, x in r.results.items()
    )  # fmt: skip
    print(f"[boundary] {r.name} ({r.dtype}, {r.seconds:.1f}s): {cells}", file=sys.stderr)
