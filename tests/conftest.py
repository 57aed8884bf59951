import os

import pytest
import torch

# The suite's models are tiny: one intra-op thread is faster for them than two on a
# 2-core box (no OpenMP spinning against the other test process), and deterministic.
torch.set_num_threads(1)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0
