import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Model tests use tiny tensors: one intra-op thread is faster on 2 cores and does not fight
    other processes (oversubscription made small convs ~20x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
