"""The native statistics kernel against float64 oracles, PyTorch's own norm, and its fallbacks."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from graddoctor import _native


@pytest.fixture
def native():
    previous = _native.set_enabled(True)
    if _native.sumsq_maxabs([torch.ones(1)]) is None:
        _native.set_enabled(previous)
        if os.environ.get("CI"):
            pytest.fail(f"the native kernel must build in CI: {_native.status()}")
        pytest.skip(_native.status())
    yield _native
    _native.set_enabled(previous)


def oracle(t: torch.Tensor) -> tuple[float, float]:
    """Sum of squares and max-abs in float64, one element type at a time, the obvious way."""
    d = t.double()
    return float((d * d).sum()), float(d.abs().max()) if d.numel() else 0.0


# Sizes around the kernel's block (512) and chunk (65536) boundaries, and the empty tensor.
SIZES = [0, 1, 7, 511, 512, 513, 4096, 65535, 65536, 65537, 3 * 65536 + 5]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-6)])
def test_sums_and_maxima_match_float64_oracle(native, dtype, rtol):
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(n, generator=g) * (i + 1)).to(dtype) for i, n in enumerate(SIZES)]
    sumsq, maxabs = native.sumsq_maxabs(ts)
    for t, s, m in zip(ts, sumsq.tolist(), maxabs.tolist()):
        want_s, want_m = oracle(t)
        assert s == pytest.approx(want_s, rel=rtol, abs=0)
        assert m == want_m  # a maximum is exact


def test_more_precise_than_torch_foreach_norm(native):
    # 4M float32 entries: PyTorch's float32 reduction drifts ~1e-6; blocks summed in float64 do not.
    t = torch.randn(1 << 22, generator=torch.Generator().manual_seed(1)) + 0.5
    exact = math.sqrt(oracle(t)[0])
    ours = math.sqrt(native.sumsq_maxabs([t])[0].item())
    theirs = torch._foreach_norm([t])[0].item()
    assert abs(ours - exact) / exact < 1e-6
    assert abs(ours - exact) <= abs(theirs - exact) + exact * 1e-7


def test_nan_and_inf(native):
    a = torch.randn(70000)
    a[123] = math.nan
    b = torch.randn(70000)
    b[69999] = -math.inf
    c = torch.tensor([1.0, math.nan, -5.0])
    sumsq, maxabs = native.sumsq_maxabs([a, b, c])
    assert math.isnan(sumsq[0]) and math.isinf(sumsq[1]) and math.isnan(sumsq[2])
    assert math.isinf(maxabs[1])
    assert maxabs[2].item() == 5.0  # NaN is skipped by the max; tensor_stats marks it from the norm


def test_result_does_not_depend_on_thread_count(native):
    ts = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (300000, 70000, 5)]
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native.sumsq_maxabs(ts))
    finally:
        torch.set_num_threads(before)
    for s, m in results[1:]:
        assert torch.equal(s, results[0][0]) and torch.equal(m, results[0][1])


def test_unsupported_tensors_are_refused(native):
    assert native.sumsq_maxabs([torch.ones(3, dtype=torch.float16)]) is None
    assert native.sumsq_maxabs([torch.ones(4, 4).t()[:, :2]]) is None  # not contiguous
    assert native.sumsq_maxabs([torch.ones(3), torch.ones(3, dtype=torch.float64)]) is None  # mixed dtypes
    assert native.sumsq_maxabs([torch.ones(3, dtype=torch.int64)]) is None
    assert native.sumsq_maxabs([]) is None


def test_views_with_an_offset_are_read_from_their_start(native):
    base = torch.arange(10, dtype=torch.float32)
    view = base[6:]  # contiguous, storage offset 6
    sumsq, maxabs = native.sumsq_maxabs([view])
    assert sumsq.item() == 36 + 49 + 64 + 81 and maxabs.item() == 9


def test_status_names_the_library(native):
    assert native.status().startswith("native kernel: in use")


def run_python(code: str, **env) -> str:
    full = {**os.environ, **env}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


PROBE = """
import torch, graddoctor
from graddoctor import _native
from graddoctor._stats import tensor_stats
t = torch.tensor([3.0, -4.0])
s = tensor_stats([t], torch.device("cpu"))
print(_native.status())
print(float(s.norm[0]), float(s.maxabs[0]))
"""


def test_without_a_compiler_the_pytorch_path_is_used(tmp_path):
    out = run_python(PROBE, CC=str(tmp_path / "no-such-compiler"), GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"),
                     TMPDIR=str(tmp_path))
    status, values = out.strip().splitlines()
    assert status.startswith("native kernel: unavailable") and "no-such-compiler" in status
    assert values == "5.0 4.0"


def test_environment_switch_turns_it_off(tmp_path):
    out = run_python(PROBE, GRADDOCTOR_NATIVE="0", GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"))
    status, values = out.strip().splitlines()
    assert status.startswith("native kernel: off")
    assert values == "5.0 4.0"
    assert not (tmp_path / "cache").exists()  # nothing was built


def test_a_fresh_cache_builds_once_and_is_reused(native, tmp_path):
    cache = tmp_path / "cache"
    first = run_python(PROBE, GRADDOCTOR_CACHE_DIR=str(cache)).splitlines()[0]
    built = sorted(cache.iterdir())
    second = run_python(PROBE, GRADDOCTOR_CACHE_DIR=str(cache)).splitlines()[0]
    assert first == second and first.startswith("native kernel: in use")
    assert sorted(cache.iterdir()) == built and len(built) == 1
