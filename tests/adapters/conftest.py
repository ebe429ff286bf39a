"""Shared by the adapter tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices gain nothing from threads, and two spinning OpenMP threads on a shared 2-core machine are many
    times slower (as in tests/eval). Modules that want it: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
