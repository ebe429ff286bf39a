import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's ops are too small to gain from threads, and on a shared 2-core machine two spinning
    OpenMP threads per process made generation ~6x slower (measured); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
