"""Robust, vectorized statistics the rules share: running median/MAD, a rank trend test, runs of steps.

Everything here takes numpy arrays that may hold NaN/Inf and never raises on them.
References: Hampel 1974 (median/MAD, 1.4826 makes MAD estimate a normal std);
Spearman 1904 / Kendall & Stuart (rank correlation, normal approximation of its null distribution).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAD_TO_STD = 1.4826


def _sorted_median(sorted_rows: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Median of each row's first n entries (rows sorted ascending, NaN last); NaN where n == 0."""
    lo = np.clip((n - 1) // 2, 0, None)
    hi = np.clip(n // 2, 0, None)
    rows = np.arange(len(sorted_rows))
    width = sorted_rows.shape[1]
    if width == 0:
        return np.full(len(sorted_rows), np.nan)
    a = sorted_rows[rows, np.minimum(lo, width - 1)]
    b = sorted_rows[rows, np.minimum(hi, width - 1)]
    return np.where(n > 0, (a.astype(np.float64) + b) / 2.0, np.nan)


def finite_median(a: np.ndarray) -> float:
    """Median of the finite entries (NaN if none; no warning)."""
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(np.median(a)) if a.size else float("nan")


def finite_max(a: np.ndarray) -> float:
    """Max of the finite entries (NaN if none; no warning)."""
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else float("nan")


def finite_mean(a: np.ndarray) -> float:
    """Mean of the finite entries (NaN if none; no warning)."""
    a = np.asarray(a, dtype=np.float64)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def row_median(a: np.ndarray) -> np.ndarray:
    """Median of the finite entries of each row of a 2-D array; NaN for rows with none (no warnings)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        return np.full(a.shape[0] if a.ndim else 0, np.nan)
    clean = np.where(np.isfinite(a), a, np.nan)
    return _sorted_median(np.sort(clean, axis=1), np.isfinite(clean).sum(axis=1))


def running_median_mad(x: np.ndarray, window: int, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and MAD of the finite values among the `window` entries before each index (not itself).

    Args:
      x: 1-D array (NaN/Inf are ignored).
      window: how many earlier entries each baseline looks at.
      min_count: fewer finite earlier entries than this gives NaN (baseline not trusted yet).
    Returns:
      (median, mad), each of x's length.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    T = len(x)
    if T == 0 or window < 1:
        return np.full(T, np.nan), np.full(T, np.nan)
    window = min(window, T)  # entries before the start are NaN padding, ignored: the same result in T x T memory
    clean = np.where(np.isfinite(x), x, np.nan)
    padded = np.concatenate([np.full(window, np.nan), clean])[:-1]
    rows = sliding_window_view(padded, window)  # rows[t] = x[t-window : t]
    n = np.isfinite(rows).sum(axis=1)
    med = _sorted_median(np.sort(rows, axis=1), n)
    dev = np.abs(rows - med[:, None])
    mad = _sorted_median(np.sort(dev, axis=1), n)
    bad = n < max(1, min_count)
    return np.where(bad, np.nan, med), np.where(bad, np.nan, mad)


def robust_z(x: np.ndarray, med: np.ndarray, mad: np.ndarray, floor: float) -> np.ndarray:
    """(x - med) / (1.4826 * MAD), with MAD floored so a flat history does not divide by zero."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (x - med) / (MAD_TO_STD * np.maximum(mad, floor))


def safe_log10(x: np.ndarray, tiny: float = 1e-30) -> np.ndarray:
    """log10 of |x| floored at `tiny` (exact zeros become -30); NaN stays NaN, +-Inf become +Inf.

    Keeps float32 input in float32 (these arrays can be 100k steps x hundreds of tensors).
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log10(np.maximum(np.abs(x), x.dtype.type(tiny)))


def block_medians(x: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce a 1-D series to at most `max_points` block medians; returns (block centres as indices, medians)."""
    x = np.asarray(x, dtype=np.float64)
    T = len(x)
    if T <= max_points:
        return np.arange(T, dtype=np.float64), x
    b = math.ceil(T / max_points)
    nb = T // b
    blocks = x[:nb * b].reshape(nb, b)
    return np.arange(nb) * b + (b - 1) / 2.0, np.median(blocks, axis=1)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, first, counts = np.unique(xs, return_index=True, return_counts=True)
    mean_rank = first + (counts - 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def trend_test(t: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Spearman rank correlation of y with t and its one-sided p-values.

    Returns:
      (rho, p_decreasing, p_increasing); (0, 1, 1) when there is too little data or no variation.
    """
    ok = np.isfinite(t) & np.isfinite(y)
    t, y = t[ok], y[ok]
    n = len(y)
    if n < 4:
        return 0.0, 1.0, 1.0
    rt, ry = _ranks(t), _ranks(y)
    st, sy = rt.std(), ry.std()
    if st == 0 or sy == 0:
        return 0.0, 1.0, 1.0
    rho = float(np.mean((rt - rt.mean()) * (ry - ry.mean())) / (st * sy))
    z = rho * math.sqrt(n - 1)  # null distribution of rho is ~ N(0, 1/(n-1))
    p_dec = 0.5 * math.erfc(-z / math.sqrt(2))  # P(Z <= z)
    p_inc = 0.5 * math.erfc(z / math.sqrt(2))   # P(Z >= z)
    return rho, p_dec, p_inc


def sustained(mask: np.ndarray, min_len: int, then_bad: np.ndarray | None = None) -> np.ndarray:
    """Entries of `mask` that belong to a run of at least `min_len` consecutive True values,
    or to a shorter run followed directly by a `then_bad` entry (e.g. a non-finite step)."""
    mask = np.asarray(mask, dtype=bool)
    T = len(mask)
    if T == 0:
        return mask
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)  # run = [start, end)
    keep = np.zeros(T, dtype=bool)
    for s, e in zip(starts, ends):
        follows_bad = then_bad is not None and e < T and bool(then_bad[e])
        if e - s >= min_len or follows_bad:
            keep[s:e] = True
    return keep
