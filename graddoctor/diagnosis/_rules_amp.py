"""Mixed precision without the scaler: a `torch.amp.GradScaler` that was not passed to `watch`.

Under a GradScaler the gradients after backward are the true ones times the loss scale (2^16 by
default), and some steps overflow to Inf/NaN; the scaler skips those steps (the weights do not
change) and halves its scale. A watch that was not given the scaler records the scaled gradients,
which then read as a critical explosion from step 0, and the overflows as non-finite gradients.
The signature, read from the store alone:
  - no `amp` series (watch was given no scaler), and the first finite steps' gradients are far
    too large for the weights (median grad/weight above `amp_grad_ratio`);
  - and either steps whose gradients were non-finite while the loss was finite, whose update was
    exactly zero (skipped), after which the gradients were finite again and the weights stayed
    finite (nothing but a scaler skips a step and recovers), or a plain SGD step whose size
    implies that the optimizer saw the recorded gradient divided by a power of two (lr * |g| /
    |update| = 2^k): GradScaler scales by powers of two, or a scale-invariant optimizer (Adam and
    kin, which divide by the gradients' own RMS) that trained normally through them: every gradient
    finite and the loss falling, which a real explosion of that size does not allow.
The cure is to pass the scaler to watch, so it records the true gradients and the skipped steps.

References: PyTorch AMP docs, "Automatic Mixed Precision" (torch.amp.GradScaler);
Micikevicius et al. 2018, "Mixed Precision Training" (loss scaling).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import _r, scale_invariant_optimizer
from ._findings import Finding
from ._remedies import remedy

# The finding's code: the recorded gradients do read as exploding; its cause (`mixed_precision`) and the
# evidence's `signature` name what they really are.
AMP_CODE = "exploding_gradient"
SIGNATURE = "amp_scaler_not_passed"

# The one remedy: a change to the user's call, not to the model (the catalogue's `pass_scaler`).
PASS_SCALER = remedy("pass_scaler")


def skipped_steps(d: RunData) -> np.ndarray:
    """Steps that look skipped by a scaler: non-finite gradients with a finite loss, an update of exactly
    zero wherever one was sampled, finite gradients again later, and finite weights throughout.
    Empty when any non-finite step does not fit (then something else went wrong)."""
    none = np.zeros(0, dtype=np.int64)
    bad = d.grad_bad
    if not bad.any() or bad[-1] or not np.isfinite(d.weight_norm).all():
        return none
    steps = d.steps[bad]
    if not np.isfinite(d.loss[bad][d.given[bad]]).all():
        return none
    sampled = np.isin(d.update_steps, steps)
    measured = d.update_measured[sampled]  # a bounded snapshot measured a subset of the tensors
    if sampled.any() and not (d.update_norm[sampled][measured] == 0).all():
        return none
    return steps


def implied_scale(d: RunData) -> Optional[float]:
    """lr * |g| / |update| at the first sampled finite step of a plain SGD run (None otherwise): the factor
    between the recorded gradient and the one the optimizer applied."""
    lr = d.meta.get("lr")
    lr = lr[0] if isinstance(lr, (list, tuple)) and lr else lr
    if d.meta.get("optimizer") != "SGD" or not isinstance(lr, (int, float)) or lr <= 0:
        return None
    for row, step in enumerate(d.update_steps):
        if not d.update_measured[row].all():  # |update| of a subset is not the global one
            continue
        at = np.flatnonzero(d.steps == step)
        upd = float(np.sqrt(np.sum(d.update_norm[row].astype(np.float64) ** 2)))
        if len(at) and np.isfinite(d.global_norm[at[0]]) and math.isfinite(upd) and upd > 0:
            return float(lr) * float(d.global_norm[at[0]]) / upd
    return None


def trained_through_it(d: RunData) -> bool:
    """A scale-invariant optimizer trained normally through gradients far too large from step 0: every
    gradient and given loss finite, and the loss of the last tenth below that of the first tenth. A real
    explosion of that size does not train normally; a constant loss scale under Adam does."""
    if not scale_invariant_optimizer(d) or d.T < 10 or d.grad_bad.any():
        return False
    losses = d.loss[d.given]
    if len(losses) < 10 or not np.isfinite(losses).all():
        return False
    tenth = max(1, len(losses) // 10)
    return bool(np.median(losses[-tenth:]) < np.median(losses[:tenth]))


def _early_ratio(d: RunData, cfg: DiagnoseConfig, over_layers: Callable = np.nanmedian) -> float:
    """Median over the first `baseline_min` finite steps of the grad/weight ratio taken over layers by
    `over_layers` (the median by default; `np.nanmin`: the smallest layer's)."""
    r = d.log_grad_ratio
    if r.shape[1] == 0:
        return float("nan")
    rows = [i for i in range(d.T) if np.isfinite(r[i]).any()][:cfg.baseline_min]
    if not rows or int(d.steps[rows[0]]) > cfg.init_max_step:
        return float("nan")
    return float(10 ** np.median([over_layers(r[i]) for i in rows]))


def amp_scaler_not_passed(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """The signature of a GradScaler's scaled gradients recorded by a watch that was not given the scaler."""
    if len(d.amp_steps) or d.T == 0:
        return None  # watch was given a scaler (or recorded nothing)
    ratio = _early_ratio(d, cfg)
    if not (ratio > cfg.amp_grad_ratio):
        return None
    skipped, scale = skipped_steps(d), implied_scale(d)
    k = round(math.log2(scale)) if scale and scale > 0 else 0
    pow2 = k >= cfg.amp_min_log2 and scale is not None and abs(scale / 2.0 ** k - 1) <= cfg.amp_pow2_tol
    # Under Adam the scale shows in neither a skipped step nor the step size, so the evidence must be the
    # scale itself: a loss scale multiplies every gradient alike, so every tensor's ratio is far too large (a
    # real explosion, e.g. through a recurrence, leaves the layers after it at their usual scale).
    unmoved = trained_through_it(d) and _early_ratio(d, cfg, np.nanmin) > cfg.amp_grad_ratio
    if not (len(skipped) or pow2 or unmoved):
        return None
    ev = {"signature": SIGNATURE, "early_median_grad_weight_ratio": _r(ratio),
          "skipped_steps": [int(s) for s in skipped[:20]], "skipped": len(skipped),
          "implied_scale": _r(scale) if scale is not None else None, "implied_scale_log2": k if pow2 else None,
          "action_needed": True,
          "reasoning": ("gradients far too large for the weights from the first steps"
                        + (f", and the SGD step applied them divided by 2^{k}" if pow2 else "")
                        + (f", yet {d.meta.get('optimizer')} (which divides by the gradients' own scale) trained "
                           "normally through them: finite gradients and a loss that fell" if unmoved else "")
                        + (f"; {len(skipped)} step(s) with non-finite gradients but a finite loss were skipped "
                           "(zero update) and training recovered" if len(skipped) else "")
                        + ": a GradScaler's scaled gradients, recorded by a watch that was not given the scaler")}
    msg = ("The recorded gradients carry a GradScaler's loss scale" + (f" (2^{k})" if pow2 else "")
           + (f" and {len(skipped)} step(s) it skipped read as non-finite" if len(skipped) else "")
           + ": pass scaler= to watch.")
    first = int(d.steps[0])
    return Finding(AMP_CODE, "warning", first, int(d.steps[-1]), (), ev, "mixed_precision", msg, (PASS_SCALER,))


def superseded_by_amp(found: list[Finding], amp: Finding, d: RunData) -> list[Finding]:
    """The findings that remain beside the AMP signature: an explosion read from the scaled gradients goes, as
    does a non-finite finding whose every step the scaler skipped (a NaN loss would have kept it)."""
    skipped = set(amp.evidence["skipped_steps"]) if amp.evidence["skipped"] <= 20 else set(skipped_steps(d).tolist())
    bad = set(d.steps[d.grad_bad].tolist())
    keep = []
    for f in found:
        if f.code == "exploding_gradient" or (f.code == "nonfinite_gradient" and bad <= skipped):
            continue
        keep.append(f)
    return [amp] + keep
