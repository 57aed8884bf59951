import os

import pytest
import torch

# Two cores are shared by the whole suite; one intra-op thread keeps runs predictable.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
