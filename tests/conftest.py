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


@pytest.fixture
def native():
    """graddoctor's native kernel, turned on; skipped where it cannot be built (a failure in CI)."""
    from graddoctor.core import _native
    previous = _native.set_enabled(True)
    if _native.sumsq_maxabs([torch.ones(1)]) is None:
        _native.set_enabled(previous)
        if os.environ.get("CI"):
            pytest.fail(f"the native kernel must build in CI: {_native.status()}")
        pytest.skip(_native.status())
    yield _native
    _native.set_enabled(previous)


@pytest.fixture(params=["native", "torch"])
def stats_path(request):
    """Run a test once with graddoctor's native statistics kernel and once with the PyTorch ops."""
    from graddoctor.core import _native
    if request.param == "native":
        request.getfixturevalue("native")  # on for this test, restored after it
        yield request.param
        return
    previous = _native.set_enabled(False)
    yield request.param
    _native.set_enabled(previous)
