"""Fused statistics against a naive per-parameter loop (the oracle)."""
import math

import pytest
import torch

from _numerics import U32, U64, gamma, norm_rel, rel_diff_tol, total_norm_rel
from graddoctor import tensor_stats, l2_norms


def naive(tensors):
    """One tensor at a time, in float64, the obvious way."""
    norm, maxabs, count = [], [], []
    for t in tensors:
        if t is None:
            norm.append(math.nan); maxabs.append(math.nan); count.append(-1)
            continue
        d = t.detach().double()
        finite = torch.isfinite(d)
        count.append(int((~finite).sum()))
        norm.append(float(torch.sqrt((d * d).sum())))
        maxabs.append(math.nan if torch.isnan(d).any() else float(d.abs().max()) if d.numel() else 0.0)
    present = [n for n, t in zip(norm, tensors) if t is not None]
    total = math.sqrt(sum(n * n for n in present)) if present else 0.0
    return norm, maxabs, count, total


def make(shapes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


SHAPES = [(7, 3), (5,), (4, 4, 2), (1,), (33, 17), (0,)]


def norm_rtol(t) -> float:
    """A stored float32 norm of `t` against the float64 oracle's.

    Either path (PyTorch's _foreach_norm, or the native kernel) sums the squares at unit roundoff
    u = float64's for float64 tensors and float32's for the others (half types accumulate in
    float32), in an order we do not assume: gamma_n(u), halved by the square root; then the
    sqrt and the float32 result round once each (_numerics.norm_rel). The oracle's own error is
    norm_rel(n, u64).
    """
    n, u = t.numel(), (U64 if t.dtype == torch.float64 else U32)
    return rel_diff_tol(norm_rel(n, u), norm_rel(n, U64, out_u=U64))


def check(tensors):
    got = tensor_stats(tensors, torch.device("cpu"))
    norm, maxabs, count, total = naive(tensors)
    present = [t for t in tensors if t is not None]
    for i, t in enumerate(tensors):
        g_norm, g_max = float(got.norm[i]), float(got.maxabs[i])
        if t is None or math.isnan(norm[i]) or math.isinf(norm[i]):
            assert (math.isnan(g_norm) and math.isnan(norm[i])) or g_norm == norm[i], i
        else:
            assert abs(g_norm - norm[i]) <= norm_rtol(t) * norm[i], (i, g_norm, norm[i])
        # a maximum is exact; only float64 values are rounded, once, to the stored float32
        max_rtol = U32 if t is not None and t.dtype == torch.float64 else 0.0
        assert (math.isnan(g_max) and math.isnan(maxabs[i])) or g_max == maxabs[i] \
            or abs(g_max - maxabs[i]) <= max_rtol * abs(maxabs[i]), i
    assert got.nonfinite.tolist() == count
    g_total = float(got.total_norm)
    if math.isnan(total):
        assert math.isnan(g_total)
    else:  # the float32 norm of the stored norms (each within its norm_rtol), formed in float32 or float64
        per_tensor = max((norm_rtol(t) for t in present), default=0.0)
        assert abs(g_total - total) <= rel_diff_tol(total_norm_rel(per_tensor, len(present)), gamma(len(present), U64)) * total
    assert got.present == tuple(t is not None for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_tensors_match_naive_loop(dtype, stats_path):
    # The oracle runs on the same low-precision values (cast up exactly), so only accumulation differs.
    check(make(SHAPES, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_none_gradients_are_marked_missing(dtype, stats_path):
    ts = make(SHAPES, dtype)
    ts[1] = None
    ts[4] = None
    check(ts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_are_counted_and_propagated(dtype, stats_path):
    ts = make(SHAPES, dtype)
    ts[0][1, 1] = float("nan")
    ts[0][2, 2] = float("inf")
    ts[2][0, 0, 0] = float("-inf")
    ts[4][3] = float("nan")  # a whole row
    got = tensor_stats(ts, torch.device("cpu"))
    _, _, count, _ = naive(ts)
    assert got.nonfinite.tolist() == count == [2, 0, 1, 0, 17, 0]
    assert math.isnan(got.norm[0]) and math.isnan(got.maxabs[0])
    assert math.isinf(got.norm[2]) and math.isinf(got.maxabs[2])
    assert math.isnan(got.total_norm)
    check(ts)


def test_mixed_dtypes_are_grouped_and_kept_in_order(stats_path):
    ts = make(SHAPES[:3], torch.float32) + make(SHAPES[3:], torch.bfloat16, seed=1)
    ts = [ts[0], ts[4], ts[1], ts[3], ts[2], ts[5]]  # interleave the groups
    check(ts)


def test_total_norm_equals_torch_get_total_norm(stats_path):
    ts = make(SHAPES, torch.float32, scale=3.0)
    expected = torch.nn.utils.get_total_norm(ts, 2.0)
    got = tensor_stats(ts, torch.device("cpu")).total_norm
    if stats_path == "torch":  # the same ops as PyTorch: bit for bit
        assert got == expected
    else:  # the native kernel sums in another order: each within the float32 bound of the exact total
        n, p = max(t.numel() for t in ts), len(ts)
        rel = total_norm_rel(norm_rel(n, U32), p)
        assert abs(float(got) - float(expected)) <= rel_diff_tol(rel, rel) * float(expected)


def test_l2_norms_match_vector_norm(stats_path):
    ts = make(SHAPES, torch.float32)
    exact = [float(torch.linalg.vector_norm(t.double())) for t in ts]
    got = l2_norms(ts, torch.device("cpu")).tolist()
    for t, g, e in zip(ts, got, exact):
        assert abs(g - e) <= norm_rtol(t) * e


def test_all_missing_gives_empty_but_valid_stats(stats_path):
    got = tensor_stats([None, None], torch.device("cpu"))
    assert got.nonfinite.tolist() == [-1, -1]
    assert got.norm.isnan().all() and float(got.total_norm) == 0.0


def test_cpu_counts_exactly_and_the_accelerator_fallback_flags():
    # The CPU path counts the tensors with a non-finite norm or max-abs; the PyTorch path off the
    # CPU (no Triton) records a 0/1 flag read off the same two statistics: the oracle's count > 0.
    from graddoctor.core._stats import _nonfinite_counts
    ts = make(SHAPES, torch.float32)
    ts[0][0, 0] = float("nan")
    ts[0][1, 1] = float("inf")
    ts[2][1, 1, 1] = float("inf")
    ts[4][0, 0] = 3e38  # finite, but its squared norm overflows: counted 0
    ts[4][0, 1] = 3e38
    norm = torch.stack([torch.linalg.vector_norm(t) for t in ts])
    maxabs = torch.stack([t.abs().max() if t.numel() else t.new_zeros(()) for t in ts])
    assert math.isinf(norm[4]) and math.isfinite(maxabs[4])
    _, _, count, _ = naive(ts)
    assert count == [2, 0, 1, 0, 0, 0]
    assert _nonfinite_counts(ts, norm, maxabs, torch.device("cpu")).tolist() == count
    # the device only picks the path here
    flag = _nonfinite_counts(ts, norm, maxabs, torch.device("cuda"))
    assert flag.tolist() == [int(c > 0) for c in count]
