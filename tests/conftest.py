
import pytest
import torch

# Tests are CPU, fp32, deterministic.
torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
