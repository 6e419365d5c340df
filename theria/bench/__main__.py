"""`python -m theria.bench <suite> [options]`."""

from __future__ import annotations

import importlib
import sys

SUITES = {
    "cpu": "one HVP through one attention call on the CPU: torch vs reference vs math SDPA",
    "gpu": "Triton first-order kernels on CUDA vs SDPA cuDNN / flash / efficient: forward, "
    "forward+backward, forward+JVP, issue 16's targets",
    "hvp": "Triton second-order kernels on CUDA: one HVP through one attention call, vs SDPA "
    "cuDNN / flash / efficient forward+backward",
    "overhead": "host (CPU) time per attention call at a tiny size, per mode: theria vs "
    "PyTorch's SDPA (CUDA; --device cpu for the torch backend)",
    "meta": "one meta-step (MAML, iMAML): theria's batched/graphed step vs the per-task loop, "
    "torch.func vmap + math SDPA, higher",
    "meta-paths": "one meta-step (MAML, iMAML) through a transformer, per attention path",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUITES:
        print("usage: python -m theria.bench <suite> [options]\n\nsuites:")
        for name, what in SUITES.items():
            print(f"  {name:10s} {what}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    try:
        module = importlib.import_module(f"theria.bench.{argv[0].replace('-', '_')}")
    except ModuleNotFoundError as e:
        sys.exit(f"theria.bench: suite {argv[0]!r} is not available in this checkout ({e})")
    module.main(argv[1:])


if __name__ == "__main__":
    main()
