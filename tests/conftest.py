"""Shared test settings: float64 checks are deterministic and seeded per test."""

import os

# Triton chooses its CPU interpreter when it is first imported, and importing torch imports it:
# so the `triton_interpret` tests need TRITON_INTERPRET=1 before anything else. On by default
# where no NVIDIA GPU is visible (CI); set TRITON_INTERPRET=0 to opt out.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
