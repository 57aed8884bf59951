"""The accelerator pass (issue 18): the Triton kernel and the PyTorch fallback against a float64 oracle,
and the absence of host syncs.

The Triton kernel runs here on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`), the same
kernel source that CUDA compiles; the tests skip where `triton` does not import. The PyTorch fallback
runs on CPU tensors (the device argument only picks the path) and on `meta`, where reading any value
raises, so a pass that completes there made no host sync.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _numerics import U32, U64, gamma, norm_rel, rel_diff_tol, total_norm_rel
from graddoctor import tensor_stats
from graddoctor.core import _native, _triton_stats
from graddoctor.core._stats import _maxabs, _nonfinite_counts, grad_and_weight_stats

ROOT = Path(__file__).resolve().parents[1]


def _import_triton_interpreted():
    """triton, imported under TRITON_INTERPRET=1, or None.

    Triton decorates its own library (`tl.zeros`, `tl.sum`, ...) when it is imported, compiled or
    interpreted by the variable at that moment, so it is imported here, at collection, before any
    test can import it another way (torch.compile looks for it); the variable is put back after.
    """
    if "triton" in sys.modules:
        return sys.modules["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else None
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton
    except ImportError:
        return None
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    return triton


TRITON = _import_triton_interpreted()
HALF_AND_SINGLE = [torch.float32, torch.bfloat16, torch.float16]


def oracle(tensors):
    """Per tensor, in float64, one at a time: L2 norm, max-abs (NaN if it holds a NaN), non-finite count."""
    norm, maxabs, count = [], [], []
    for t in tensors:
        d = t.detach().double().flatten()
        count.append(int((~torch.isfinite(d)).sum()))
        norm.append(float(torch.sqrt((d * d).sum())))
        maxabs.append(math.nan if d.isnan().any() else float(d.abs().max()) if d.numel() else 0.0)
    return norm, maxabs, count


def norm_rtol(t) -> float:
    # Squares of the (exactly widened) entries summed in float32 in any order, a float32 square root:
    # norm_rel(n, u32); the oracle's own error is norm_rel(n, u64) (see tests/_numerics.py).
    return rel_diff_tol(norm_rel(t.numel(), U32), norm_rel(t.numel(), U64, out_u=U64))


def tensors(dtype, nonfinite=True):
    """Shapes spanning one entry to several chunks; empty tensors at the ends and in the middle."""
    g = torch.Generator().manual_seed(0)
    shapes = [(0,), (7, 3), (5,), (1,), (0, 4), (33, 17), (9000,), (2, 0)]
    ts = [(torch.randn(s, generator=g) * 2.0).to(dtype) for s in shapes]
    if nonfinite:
        ts[1][1, 1] = math.nan
        ts[1][2, 2] = math.inf
        ts[5][3] = math.nan  # a whole row
        ts[6][17] = -math.inf
        ts[6][8999] = math.inf
    return ts


def assert_stats(norm, maxabs, count, ts, nan_maxabs=True):
    """Each entry against the oracle: norms within the float32 bound, max-abs and counts exact."""
    want_norm, want_max, want_count = oracle(ts)
    assert [int(c) for c in count] == want_count
    for i, t in enumerate(ts):
        got, want = float(norm[i]), want_norm[i]
        if math.isfinite(want):
            assert abs(got - want) <= norm_rtol(t) * want, (i, t.dtype, got, want)
        else:
            assert (math.isnan(got) and math.isnan(want)) or got == want, (i, got, want)
        if math.isnan(want_max[i]) and not nan_maxabs:
            continue  # the raw kernel leaves this unspecified; tensor_stats sets it from the norm
        got_max = float(maxabs[i])
        if math.isnan(want_max[i]):
            assert math.isnan(got_max), (i, got_max)
        else:  # exact; a float64 maximum is rounded once to the stored float32
            rtol = U32 if t.dtype == torch.float64 else 0.0
            assert got_max == want_max[i] or abs(got_max - want_max[i]) <= rtol * abs(want_max[i]), (i, got_max)


# ---------------------------------------------------------------- the Triton kernel, interpreted


@pytest.fixture
def interpreted(monkeypatch):
    """The Triton kernels on CPU tensors, under the interpreter; the native CPU kernel off."""
    if TRITON is None:
        pytest.skip("triton is not installed (or was imported before this module, not interpreted)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # our kernels are made interpreted, like Triton's library
    previous_devices = _triton_stats.enable_on({"cuda", "cpu"})
    previous_native = _native.set_enabled(False)
    yield
    _native.set_enabled(previous_native)
    _triton_stats.enable_on(previous_devices)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
@pytest.mark.parametrize("block,chunk_blocks", [(64, 4), (1024, 8)])
def test_triton_kernel_matches_the_float64_oracle(interpreted, dtype, block, chunk_blocks):
    # (64, 4): chunks of 256 entries, so most tensors span several chunks (the 9000-entry one 36; at the
    # default 8192-entry chunks, 2) and the second kernel adds them up.
    ts = tensors(dtype)
    norm, maxabs, count = _triton_stats.fused_stats(ts, block, chunk_blocks)
    assert norm.dtype == maxabs.dtype == torch.float32 and count.dtype == torch.int64
    want_norm, want_max, want_count = oracle(ts)
    assert want_count == [0, 2, 0, 0, 0, 17, 2, 0]
    assert_stats(norm, maxabs, count, ts, nan_maxabs=False)


def test_triton_kernel_reads_tensors_in_place_strided_ones_copied(interpreted):
    # Views into one storage (offsets inside it) and a transposed (non-contiguous) tensor.
    base = torch.randn(4000)
    ts = [base[10:500], base[1000:1001], base[2000:4000].view(40, 50).t(), base[:3]]
    norm, maxabs, count = _triton_stats.fused_stats(ts, 64, 4)
    assert_stats(norm, maxabs, count, ts)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_tensor_stats_through_the_triton_kernel(interpreted, dtype):
    ts = tensors(dtype)
    ts.insert(3, None)  # a parameter without a gradient this step
    got = tensor_stats(ts, torch.device("cpu"))
    present = [t for t in ts if t is not None]
    keep = [i for i, t in enumerate(ts) if t is not None]
    assert_stats(got.norm[keep], got.maxabs[keep], got.nonfinite[keep], present)
    assert math.isnan(got.norm[3]) and int(got.nonfinite[3]) == -1
    assert math.isnan(got.total_norm)  # a NaN anywhere makes the total NaN, as get_total_norm's


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_total_norm_is_formed_as_get_total_norm_does(interpreted, dtype):
    ts = tensors(dtype, nonfinite=False)
    got = tensor_stats(ts, torch.device("cpu"))
    # the same op over the stored per-tensor norms: bit for bit
    assert torch.equal(got.total_norm, torch.linalg.vector_norm(got.norm, 2))
    # within the float32 bound of the exact total: per-tensor norms each within norm_rel, then their norm
    exact = math.sqrt(sum(n * n for n in oracle(ts)[0]))
    rel = total_norm_rel(max(norm_rel(t.numel(), U32) for t in ts), len(ts))
    assert abs(float(got.total_norm) - exact) <= rel_diff_tol(rel, gamma(len(ts), U64)) * exact
    if dtype == torch.float32:  # and of PyTorch's own get_total_norm (which returns half types in their dtype)
        expected = float(torch.nn.utils.get_total_norm(ts, 2.0))
        assert abs(float(got.total_norm) - expected) <= rel_diff_tol(rel, rel) * expected


def test_triton_path_mixed_dtypes_keep_their_order(interpreted):
    a, b = tensors(torch.float32), tensors(torch.bfloat16)
    ts = [x for pair in zip(a, b) for x in pair] + [torch.randn(9, dtype=torch.float64)]  # float64: PyTorch path
    got = tensor_stats(ts, torch.device("cpu"))
    assert_stats(got.norm, got.maxabs, got.nonfinite, ts)


def test_triton_path_reuses_its_tables_when_addresses_repeat(interpreted):
    # The chunk table depends on the sizes only, the offsets on the addresses: same tensors, no new copy.
    ts = tensors(torch.float32, nonfinite=False)
    _triton_stats.fused_stats(ts)
    tables, offsets = len(_triton_stats._TABLES), len(_triton_stats._OFFSETS)
    norm, _, _ = _triton_stats.fused_stats(ts)
    assert (len(_triton_stats._TABLES), len(_triton_stats._OFFSETS)) == (tables, offsets)
    moved = [t.clone() for t in ts]  # new addresses, same sizes: new offsets, same table
    norm2, _, _ = _triton_stats.fused_stats(moved)
    assert len(_triton_stats._TABLES) == tables
    assert torch.equal(norm, norm2)  # same values read in the same order: the same float32 result


# ---------------------------------------------------------------- the PyTorch fallback


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE + [torch.float64])
def test_pytorch_fallback_off_the_cpu_against_the_oracle(dtype):
    # The accelerator fallback's own ops, run on CPU tensors (the device argument picks the path):
    # _foreach_norm(inf) for the max-abs, and a 0/1 non-finite flag from the norm and the max-abs.
    ts = tensors(dtype)
    ts[3][0] = 3e38 if dtype in (torch.float32, torch.float64) else ts[3][0]  # finite; float32's square overflows
    accel = torch.device("meta")
    wide = dtype in (torch.float16, torch.bfloat16)
    norm = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32 if wide else None)).float()
    maxabs = _maxabs(ts, accel).float()
    flag = _nonfinite_counts(ts, norm, maxabs, accel)
    _, want_max, want_count = oracle(ts)
    assert flag.tolist() == [int(c > 0) for c in want_count]
    for i, w in enumerate(want_max):
        if not math.isnan(w):
            assert float(maxabs[i]) == pytest.approx(w, rel=U32 if dtype == torch.float64 else 0.0), i


def test_fallback_on_meta_makes_no_host_sync():
    # On `meta` every .item(), .cpu(), bool() or .tolist() of a tensor raises: the pass completing is the proof.
    meta = torch.device("meta")
    ts = [torch.empty(3, 4, device=meta), None, torch.empty(0, device=meta),
          torch.empty(5, device=meta, dtype=torch.bfloat16), torch.empty(2, 2, device=meta, dtype=torch.float16)]
    got = tensor_stats(ts, meta)
    assert got.norm.shape == got.maxabs.shape == got.nonfinite.shape == (5,)
    assert got.nonfinite.dtype == torch.int64 and got.total_norm.shape == ()
    stats, weight_norms = grad_and_weight_stats(ts, [torch.empty(3, device=meta)] * 5, meta)
    assert weight_norms.shape == (5,) and stats.present == (True, False, True, True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_makes_no_host_sync():
    ts = [g.cuda() for g in tensors(torch.float32)] + [g.cuda() for g in tensors(torch.bfloat16)]
    tensor_stats(ts, torch.device("cuda"))  # warm-up: the tables' first copies
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = tensor_stats(ts, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    if _triton_stats.available(ts[0].device, torch.float32):  # exact counts from the kernel (else 0/1 flags)
        assert_stats(got.norm.cpu(), got.maxabs.cpu(), got.nonfinite.cpu(), [t.cpu() for t in ts])


# ---------------------------------------------------------------- the benchmark runs end to end


@pytest.mark.slow
def test_gpu_overhead_benchmark_runs_on_cpu(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_overhead.py"), "--device", "cpu",
                           "--steps", "3", "--warmup", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows[2:]]
    assert names == ["bare", "bare (A/A control)", "clip_grad_norm_", "watch", "watch, weight_every=10",
                     "watch + clip_norm guard", "lightning grad_norm"]
    for r in rows[2:]:
        cells = [c.strip() for c in r.split("|")[2:-1]]
        assert float(cells[0]) > 0 and all(math.isfinite(float(c)) for c in cells[1:3]), r
