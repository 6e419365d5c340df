"""Shared test settings: float64 checks are deterministic and seeded per test.

Triton's interpreter and CUDA launches cannot share a process: Triton picks its interpreter
when it is first imported (importing torch imports it), and the interpreter tests
(`triton_interpret`) need it on, the CUDA tests off. So:
- no CUDA device (CI, a laptop): TRITON_INTERPRET=1 is set here and one process runs all
  (the CUDA tests skip);
- a CUDA device: this process runs the CUDA tests and skips the interpreter tests, and
  `python -m tests.interpret` (the second line of `make test`) runs them in a process of
  their own with TRITON_INTERPRET=1 and the GPU hidden.
The device is asked of the CUDA driver itself (libcuda's cuDeviceGetCount), not guessed from
device files (some GPU machines have no /dev/nvidiactl) and without importing torch.
Set TRITON_INTERPRET yourself (0 or 1) to override.
"""

import ctypes
import os


def cuda_device_present() -> bool:
    """Whether the CUDA driver reports at least one device (False without a driver)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


if "TRITON_INTERPRET" not in os.environ and not cuda_device_present():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items) -> None:
    if INTERPRETING:
        return
    skip = pytest.mark.skip(
        reason="Triton interpreter test: a CUDA device is present, so this process launches "
        "kernels on it; `make test` runs these in a second process (python -m tests.interpret)"
    )
    for item in items:
        if "triton_interpret" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
