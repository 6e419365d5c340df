"""These tests run many tiny ops: one intra-op thread avoids OpenMP spin contention on a
shared 2-core machine (20× slower steps measured under load), and changes no result."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
