"""The native statistics kernel against float64 oracles, PyTorch's own norm, and its fallbacks."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _numerics import U32, U64, gamma, mean_std_bounds, norm_rel, rel_diff_tol, sumsq_rel
from graddoctor.core import _native

# The kernel adds at most GD_BLOCK squares in the data's accumulation precision (float32 for float32
# and bfloat16, float64 for float64) before the block sum moves to float64 (fused_stats.c).
BLOCK = int(re.search(r"#define GD_BLOCK (\d+)", (Path(_native.__file__).with_name("fused_stats.c")).read_text()).group(1))


def acc_u(dtype: torch.dtype) -> float:
    """Unit roundoff the kernel accumulates in: float32 for float32/bfloat16 data, float64 for float64."""
    return U64 if dtype == torch.float64 else U32


def sumsq_rtol(n: int, dtype: torch.dtype) -> float:
    """The kernel's sum of squares against the float64 oracle: the kernel's blocked bound plus the oracle's own."""
    return rel_diff_tol(sumsq_rel(n, acc_u(dtype), BLOCK), gamma(n, U64))


def norm_rtol(n: int, dtype: torch.dtype) -> float:
    """A float32 norm from the kernel (sqrt in float64, rounded to float32) against the float64 oracle's norm."""
    return rel_diff_tol(norm_rel(n, acc_u(dtype), BLOCK, sqrt_u=U64, out_u=U32), norm_rel(n, U64, sqrt_u=U64, out_u=U64))


def oracle(t: torch.Tensor) -> tuple[float, float]:
    """Sum of squares and max-abs in float64, one element type at a time, the obvious way."""
    d = t.double()
    return float((d * d).sum()), float(d.abs().max()) if d.numel() else 0.0


# Sizes around the kernel's block (512) and chunk (65536) boundaries, and the empty tensor.
SIZES = [0, 1, 7, 511, 512, 513, 4096, 65535, 65536, 65537, 3 * 65536 + 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sums_and_maxima_match_float64_oracle(native, dtype):
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(n, generator=g) * (i + 1)).to(dtype) for i, n in enumerate(SIZES)]
    sumsq, maxabs = native.sumsq_maxabs(ts)
    for t, s, m in zip(ts, sumsq.tolist(), maxabs.tolist()):
        want_s, want_m = oracle(t)
        # squares summed in blocks of BLOCK (float32 for float32/bf16 data) and the blocks in float64:
        # |err| <= gamma_BLOCK(u) (+ gamma_n(u64)) x the sum, all terms >= 0 (_numerics.sumsq_rel)
        assert abs(s - want_s) <= sumsq_rtol(t.numel(), dtype) * want_s
        assert m == want_m  # a maximum is exact


def test_blocked_sums_keep_a_long_float32_norm_precise(native):
    # 4M float32 entries. A float32 sum of n terms in an unknown order (PyTorch's reduction, whose
    # order and accumulator differ by build and CPU) is only guaranteed to gamma_n(u32) ~ 0.25 here;
    # the kernel's float32 runs are at most BLOCK long, the rest is float64: gamma_BLOCK ~ 3e-5.
    n = 1 << 22
    t = torch.randn(n, generator=torch.Generator().manual_seed(1)) + 0.5
    exact_sq = oracle(t)[0]
    ours_sq = native.sumsq_maxabs([t])[0].item()
    assert sumsq_rel(n, U32, BLOCK) < 1e-3 * sumsq_rel(n, U32)
    assert abs(ours_sq - exact_sq) <= sumsq_rtol(n, torch.float32) * exact_sq  # the worst case
    # The typical case, which the worst case cannot show: under the standard probabilistic model
    # (independent, mean-zero rounding errors, |d| <= u; Higham & Mary 2019), the first-order error
    # sum_j d_j P_j (P_j: the partial sums of the float32 runs, each <= its block's total B, at most
    # BLOCK - 1 of them per block; plus one rounding per square) is a martingale with increments
    # <= u |P_j|, so by Azuma |err| <= lam u sqrt((BLOCK - 1) sum_b B_b^2 + sum x^4) with probability
    # >= 1 - 2 exp(-lam^2 / 2); lam = 7: 5e-11. Blocks start every BLOCK entries of the tensor.
    sq = t.double() ** 2
    blocks = sq.reshape(-1, BLOCK).sum(dim=1)
    lam = 7.0
    typical = lam * U32 * math.sqrt((BLOCK - 1) * float((blocks ** 2).sum()) + float((sq ** 2).sum()))
    typical = typical * (1 + gamma(BLOCK, U32)) + gamma(n, U64) * exact_sq  # second order, float64 sums, oracle
    assert abs(ours_sq - exact_sq) <= typical
    assert typical < 2e-7 * exact_sq  # what that bound is worth here: ~1e-7 on the norm


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
    assert native.grad_stats([torch.ones(3), None]) is None  # a missing gradient: the grouped path takes it

    class Wrapped(torch.Tensor):  # a subclass (as DTensor is) may hold no flat data at data_ptr()
        pass

    assert native.grad_stats([torch.ones(3).as_subclass(Wrapped)]) is None
    # parameters are plain; 1 + 1 + 1 is exact, so the norm is sqrt(3) rounded to float32, exactly
    assert native.norms([torch.nn.Parameter(torch.ones(3))]).item() == float(torch.tensor(3 ** 0.5, dtype=torch.float32))


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
from graddoctor.core import _native
from graddoctor.core._stats import tensor_stats
t = torch.tensor([3.0, -4.0])
s = tensor_stats([t], torch.device("cpu"))
print(_native.status())
print(float(s.norm[0]), float(s.maxabs[0]))
"""


@pytest.mark.slow
def test_without_a_compiler_the_pytorch_path_is_used(tmp_path):
    out = run_python(PROBE, CC=str(tmp_path / "no-such-compiler"), GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"),
                     TMPDIR=str(tmp_path))
    status, values = out.strip().splitlines()
    assert status.startswith("native kernel: unavailable") and "no-such-compiler" in status
    assert values == "5.0 4.0"


@pytest.mark.slow
def test_environment_switch_turns_it_off(tmp_path):
    out = run_python(PROBE, GRADDOCTOR_NATIVE="0", GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"))
    status, values = out.strip().splitlines()
    assert status.startswith("native kernel: off")
    assert values == "5.0 4.0"
    assert not (tmp_path / "cache").exists()  # nothing was built


@pytest.mark.slow
def test_a_fresh_cache_builds_once_and_is_reused(native, tmp_path):
    cache = tmp_path / "cache"
    first = run_python(PROBE, GRADDOCTOR_CACHE_DIR=str(cache)).splitlines()[0]
    built = sorted(cache.iterdir())
    second = run_python(PROBE, GRADDOCTOR_CACHE_DIR=str(cache)).splitlines()[0]
    assert first == second and first.startswith("native kernel: in use")
    assert sorted(cache.iterdir()) == built and len(built) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_copy_and_diff_passes_match_pytorch(native, dtype):
    g = torch.Generator().manual_seed(2)
    src = [torch.randn(n, generator=g).to(dtype) for n in (70001, 513, 0, 3)]
    dst = [torch.full_like(t, 7.0) for t in src]
    norms = native.copy_norms(src, dst)
    assert norms.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(src, dst))  # the snapshot is an exact copy
    for t, n in zip(src, norms.tolist()):
        want = math.sqrt(oracle(t)[0])
        assert abs(n - want) <= norm_rtol(t.numel(), dtype) * want
    moved = [(t.double() + 1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(dtype) for t in src]
    got = native.diff_norms(moved, src)
    for a, b, n in zip(moved, src, got.tolist()):
        # the oracle: PyTorch's own difference in the tensors' dtype (a correctly rounded subtraction,
        # the same bits as the kernel's), then float64; only the sum of squares differs
        want = math.sqrt(oracle(a - b)[0])
        assert abs(n - want) <= norm_rtol(a.numel(), dtype) * want
    assert native.norms(src).tolist() == norms.tolist()  # the plain weight-norm pass agrees with the copy's


def test_copy_and_diff_refuse_mismatched_lists(native):
    a = [torch.ones(3)]
    assert native.copy_norms(a, [torch.ones(4)]) is None
    assert native.diff_norms(a, [torch.ones(3, dtype=torch.float64)]) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grad_stats_match_float64_oracle_with_nan_and_inf(native, dtype):
    g = torch.Generator().manual_seed(7)
    ts = [(torch.randn(n, generator=g) * (i + 1)).to(dtype) for i, n in enumerate((70000, 513, 1, 0, 300))]
    ts[0][123] = math.nan
    ts[0][9] = math.inf
    ts[2][0] = -math.inf
    ts[4][[3, 4, 5]] = math.nan
    norm, maxabs, count, total, _ = native.grad_stats(ts)
    assert norm.dtype == maxabs.dtype == total.dtype == torch.float32 and count.dtype == torch.int64
    assert total.dim() == 0
    for t, n, m, c in zip(ts, norm.tolist(), maxabs.tolist(), count.tolist()):
        d = t.double()
        assert c == int((~torch.isfinite(d)).sum())  # the naive count of NaN and Inf entries
        if torch.isnan(d).any():
            assert math.isnan(n) and math.isnan(m)
        else:
            want = math.sqrt(float((d * d).sum()))
            assert abs(n - want) <= norm_rtol(t.numel(), dtype) * want or (math.isinf(n) and math.isinf(want))
            assert m == (float(d.abs().max()) if d.numel() else 0.0)
    assert math.isnan(total.item())  # a NaN norm makes the total NaN, as torch.nn.utils.get_total_norm's
    clean = [t for t in ts if torch.isfinite(t.double()).all()]
    want = torch.linalg.vector_norm(torch.stack(native.grad_stats(clean)[0].unbind()).double()).item()
    # the norm of the stored float32 norms: summed and rooted in float64, rounded to float32 once
    p = len(clean)
    total_rtol = rel_diff_tol(norm_rel(p, U64, out_u=U32), norm_rel(p, U64, out_u=U64))
    assert abs(native.grad_stats(clean)[3].item() - want) <= total_rtol * want


def moments_oracle(x: torch.Tensor):
    d = x.double()
    nonfinite = int((~torch.isfinite(d)).sum())
    maxabs = math.nan if torch.isnan(d).any() else float(d.abs().max())
    return maxabs, nonfinite, float(d.mean()), float(d.std())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: a batch whose mean is far from zero
def test_input_row_matches_float64_oracle(native, dtype, offset):
    x = (torch.randn(256, 700, generator=torch.Generator().manual_seed(3)) + offset).to(dtype)
    got = native.input_row(x).tolist()
    want = moments_oracle(x)
    assert got[0] == want[0] and got[1] == want[1]
    # bounds from the shifted sums the kernel forms (_numerics.mean_std_bounds): they scale with
    # sum |x_i - x_0|, not sum |x_i|, so at offset 1e4 the std keeps ~5 digits, where unshifted
    # float32 sums (error ~ gamma_BLOCK * n * 1e8 in the sum of squares) would keep none
    mean_tol, std_tol = mean_std_bounds(x, acc_u(dtype), BLOCK)
    assert abs(got[2] - want[2]) <= mean_tol
    assert abs(got[3] - want[3]) <= std_tol
    assert std_tol < 1e-3 * want[3] or want[3] == 0  # (bfloat16 rounds every entry near 1e4 to one value)


def test_input_row_with_nan_inf_and_tiny_tensors(native):
    x = torch.randn(1000)
    x[5], x[17], x[999] = math.nan, math.inf, -math.inf
    maxabs, count, mean, std = native.input_row(x).tolist()
    assert math.isnan(maxabs) and count == 3 and math.isnan(mean) and math.isnan(std)
    y = torch.randn(1000)
    y[0] = math.inf  # the first entry is the shift: an Inf there must not poison the finite rest
    maxabs, count, mean, std = native.input_row(y).tolist()
    assert math.isinf(maxabs) and count == 1 and math.isinf(mean)
    one = native.input_row(torch.tensor([2.5])).tolist()
    assert one[:3] == [2.5, 0.0, 2.5] and math.isnan(one[3])  # Tensor.std of one entry is NaN
    assert all(math.isnan(v) for v in native.input_row(torch.zeros(0)).tolist())


@pytest.mark.slow
def test_a_compiler_without_openmp_still_builds_a_vectorized_kernel(native, tmp_path):
    # A stand-in for Apple's clang: refuses -fopenmp, accepts everything else.
    fake = tmp_path / "cc-without-openmp"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = "-fopenmp" ] && { echo "unsupported: -fopenmp" >&2; exit 1; }; done\n'
                    'exec cc "$@"\n')
    fake.chmod(0o755)
    out = run_python(PROBE, CC=str(fake), GRADDOCTOR_CACHE_DIR=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    status, values = out.strip().splitlines()
    assert "built with -O3 -march=native -fopenmp-simd" in status
    assert values == "5.0 4.0"


def test_channels_last_tensors_are_read_in_place(native):
    g = torch.Generator().manual_seed(6)
    ts = [torch.randn(8, 3, 5, 7, generator=g).to(memory_format=torch.channels_last),
          torch.randn(2, 3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last_3d)]
    assert not any(t.is_contiguous() for t in ts)
    sumsq, maxabs = native.sumsq_maxabs(ts)
    for t, s, m in zip(ts, sumsq.tolist(), maxabs.tolist()):
        assert abs(s - oracle(t)[0]) <= sumsq_rtol(t.numel(), t.dtype) * oracle(t)[0] and m == oracle(t)[1]
    snap = [torch.empty_like(t) for t in ts]  # empty_like keeps the memory format
    native.copy_norms(ts, snap)
    assert all(torch.equal(a, b) for a, b in zip(ts, snap))
    # different layouts of the same shape do not correspond entry for entry: refused
    assert native.diff_norms([ts[0]], [ts[0].contiguous()]) is None
    want = moments_oracle(ts[0])
    got = native.input_row(ts[0]).tolist()
    mean_tol, std_tol = mean_std_bounds(ts[0], U32, BLOCK)  # float32 accumulation bounds for these entries
    assert got[0] == want[0] and abs(got[2] - want[2]) <= mean_tol and abs(got[3] - want[3]) <= std_tol


def test_scale_is_pytorchs_float32_multiply(native):
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(n, generator=g) for n in (0, 1, 511, 513, 65537, 3 * 65536 + 5)]
    coef = torch.tensor(0.1234567, dtype=torch.float32)
    want = [t.clone() for t in grads]
    torch._foreach_mul_(want, coef)  # what clip_grads_with_norm_ does
    versions = [t._version for t in grads]
    assert native.scale_(grads, float(coef))
    assert all(torch.equal(a, b) for a, b in zip(grads, want))  # bit for bit
    assert all(t._version > v for t, v in zip(grads, versions))  # autograd is told of the write


def test_clip_scale_forms_pytorchs_coefficient_bit_for_bit(native):
    # Oracle: the coefficient expression of torch.nn.utils.clip_grads_with_norm_, on each 0-d total.
    g = torch.Generator().manual_seed(11)
    totals = torch.cat([
        torch.rand(2000, generator=g) * 4,                         # around max_norm
        torch.exp(torch.randn(2000, generator=g) * 20),            # many magnitudes
        torch.tensor([0.0, 1e-45, 1e-7, 0.999999, 1.0, 1.000001, 3.4e38, math.inf, math.nan]),
    ])
    for max_norm in (1.0, 0.1, 5.0, 1e-3, 123.456):
        for t in totals:
            want = torch.clamp(max_norm / (t + 1e-6), max=1.0)
            got = _native_coefficient(native, t, max_norm)
            assert torch.equal(got, want) or (got.isnan() and want.isnan()), (float(t), max_norm)


def _native_coefficient(native, total, max_norm):
    """The kernel's coefficient for one 0-d total, on one small gradient (so the multiply runs too)."""
    grad = torch.ones(3)
    coef = native.clip_scale_([grad], total.reshape(()).clone(), max_norm)
    assert coef is not None and coef.dtype == torch.float32 and coef.shape == ()
    c = float(coef)
    if c == c:
        assert grad.tolist() == [c] * 3  # 1.0 * coef: the gradient holds the coefficient after the multiply
    return coef


@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 1e6])
def test_clip_scale_equals_clip_grads_with_norm(native, max_norm):
    g = torch.Generator().manual_seed(12)
    grads = [torch.randn(n, generator=g) * 3 for n in (0, 1, 511, 65537, 3 * 65536 + 5)]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in grads]))
    ref = [torch.nn.Parameter(torch.empty_like(t)) for t in grads]
    for p, t in zip(ref, grads):
        p.grad = t.clone()
    torch.nn.utils.clip_grads_with_norm_(ref, max_norm, total)
    want = [p.grad for p in ref]
    versions = [t._version for t in grads]
    coef = native.clip_scale_(grads, total, max_norm)
    assert all(torch.equal(a, b) for a, b in zip(grads, want))  # bit for bit
    clipped = float(coef) < 1.0
    assert clipped == (max_norm < float(total))
    assert all((t._version > v) == clipped for t, v in zip(grads, versions))  # written (and said so) only if clipped


def test_clip_scale_refuses_and_changes_nothing(native):
    a = torch.ones(4)
    total = torch.tensor(8.0)
    assert native.clip_scale_([a.to(torch.bfloat16)], total, 1.0) is None
    assert native.clip_scale_([torch.ones(4, requires_grad=True)], total, 1.0) is None
    assert native.clip_scale_([a, None], total, 1.0) is None
    assert native.clip_scale_([a], total.double(), 1.0) is None  # a total that is not float32
    assert native.clip_scale_([a], torch.tensor([8.0, 1.0]), 1.0) is None  # nor a scalar
    assert a.tolist() == [1.0] * 4


def test_scale_refuses_what_it_cannot_write_exactly(native):
    a = torch.ones(4)
    assert not native.scale_([a.to(torch.bfloat16)], 0.5)  # PyTorch rounds bf16 products its own way
    assert not native.scale_([torch.ones(4, requires_grad=True)], 0.5)  # in a graph: autograd must see it
    assert not native.scale_([a, None], 0.5)
    assert a.tolist() == [1.0] * 4  # a refusal changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_grad_stats_reads_the_weights_beside_the_gradients(native, dtype):
    g = torch.Generator().manual_seed(9)
    sizes = (0, 1, 513, 65537, 3 * 65536 + 5)
    grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    weights = [(torch.randn(n, generator=g) * 3).to(dtype) for n in sizes]
    alone = native.grad_stats(grads)
    both = native.grad_stats(grads, weights)
    assert alone[4] is None
    for a, b in zip(alone[:4], both[:4]):  # the gradients' statistics do not change
        assert torch.equal(a, b)
    for w, n in zip(weights, both[4].tolist()):
        want = math.sqrt(oracle(w)[0])
        assert abs(n - want) <= norm_rtol(w.numel(), dtype) * want
    # weights that do not pair up with the gradients are not read; the gradients still are
    assert native.grad_stats(grads, weights[::-1])[4] is None
    assert native.grad_stats(grads, [w.double() if dtype != torch.float64 else w.float() for w in weights])[4] is None
