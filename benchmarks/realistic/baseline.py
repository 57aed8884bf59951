"""The plain threshold monitor issue 16 compares graddoctor with, on a run's stored series.

Three rules, each mapped to the finding code it stands for:
- the loss above 5x its rolling mean (the mean of the 50 finite losses before it): `loss_spike`;
- the global gradient norm above 100 (`exploding_gradient`) or below 1e-7 (`vanishing_gradient`);
  a non-finite global norm counts as above 100 (a monitor that reads NaN as healthy would be useless);
- no 1% improvement of the best loss in 100 steps: `loss_not_decreasing`.
It knows no causes and no remedies, so only its codes are scored.
"""
from __future__ import annotations

import numpy as np

from graddoctor.diagnosis import RunData

WINDOW, SPIKE_FACTOR = 50, 5.0
NORM_HIGH, NORM_LOW = 100.0, 1e-7
PATIENCE, MIN_IMPROVEMENT = 100, 0.01


def threshold_codes(d: RunData) -> dict[str, int]:
    """{finding code: first step its rule fired} for the rules that fired."""
    steps, loss = d.steps, d.loss.astype(np.float64)
    g = d.global_norm.astype(np.float64)
    fired = {"loss_spike": loss > SPIKE_FACTOR * rolling_mean(loss, WINDOW),
             "exploding_gradient": (g > NORM_HIGH) | ~np.isfinite(g),
             "vanishing_gradient": g < NORM_LOW,
             "loss_not_decreasing": plateau(loss, PATIENCE, MIN_IMPROVEMENT)}
    return {code: int(steps[mask][0]) for code, mask in fired.items() if mask.any()}


def rolling_mean(loss: np.ndarray, window: int) -> np.ndarray:
    """Mean of the `window` finite losses before each step (NaN until `window` steps have passed)."""
    out = np.full(len(loss), np.nan)
    finite = np.isfinite(loss)
    c = np.concatenate([[0.0], np.cumsum(np.where(finite, loss, 0.0))])
    n = np.concatenate([[0], np.cumsum(finite)])
    t = np.arange(window, len(loss))
    count = n[t] - n[t - window]
    with np.errstate(invalid="ignore", divide="ignore"):
        out[t] = np.where(count > 0, (c[t] - c[t - window]) / np.maximum(count, 1), np.nan)
    return out


def plateau(loss: np.ndarray, patience: int, min_improvement: float) -> np.ndarray:
    """True at step t when the best loss of steps (t-patience, t] is not 1% below the best before them.
    Non-finite losses are never an improvement."""
    safe = np.where(np.isfinite(loss), loss, np.inf)
    best = np.minimum.accumulate(safe)
    out = np.zeros(len(loss), dtype=bool)
    for t in range(patience, len(loss)):
        before = best[t - patience]
        out[t] = np.isfinite(before) and not safe[t - patience + 1:t + 1].min() < (1 - min_improvement) * before
    return out
