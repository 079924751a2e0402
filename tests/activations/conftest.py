import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: with several threads on a loaded machine, OpenMP's spin-waits dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
