"""Shared test settings: float64 checks are deterministic and seeded per test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
