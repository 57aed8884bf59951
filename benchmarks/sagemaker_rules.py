"""Baselines for diagnose: SageMaker Debugger's documented default rules, and simple threshold monitors.

Implemented from the SageMaker Debugger built-in rules documentation (default parameters), over
graddoctor's stored statistics (`RunData`), evaluating every recorded step as a "saved step":

- VanishingGradient: mean |g| of a tensor below threshold=1e-7 (any tensor, any step). We store
  each tensor's L2 norm, not mean |g|; mean |g| is estimated as sqrt(2/pi) * RMS (exact for
  Gaussian entries; mean |g| <= RMS always).
- ExplodingTensor: any NaN/Inf in gradients, weights or the loss (only_nan=False).
- DeadRelu: more than threshold_layer=50% of a ReLU layer's units inactive. A unit counts as
  inactive when it is zero over the whole sampled batch (our frac_dead_units); SageMaker's
  threshold_inactivity=1% of inputs is close to that.
- SaturatedActivation: more than threshold_layer=50% of a tanh/sigmoid layer saturated. SageMaker
  measures pre-activations beyond +-9.4999 (tanh) / -23..16.99 (sigmoid); we only have outputs
  within 1% of a bound, a looser test, so this baseline fires at least as often as SageMaker would.
- LossNotDecreasing: loss at a step not below the loss num_steps=10 saved steps back
  (diff_percent=0).
- WeightUpdateRatio: update/(weight+1e-9) above large_threshold=10 or below small_threshold=1e-8,
  over smdebug's default "weights" collection (parameter names ending in "weight"; biases excluded).

Threshold monitors (the issue's "simple threshold monitors"): global gradient norm > 100
(exploding) or < 1e-7 (vanishing); loss > 5x its rolling mean over 50 steps (loss spike).

Each function returns {rule: first step it fired, or None}. `*_codes` maps verdicts to
graddoctor finding codes so benchmarks/diagnose_compare.py can score both on one table.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graddoctor.diagnosis import RunData  # noqa: E402

SAGEMAKER_TO_CODES = {
    "VanishingGradient": ("vanishing_gradient",),
    "ExplodingTensor": ("exploding_gradient", "nonfinite_gradient"),
    "DeadRelu": ("dead_relu",),
    "SaturatedActivation": ("saturated_activation",),
    "LossNotDecreasing": ("loss_not_decreasing",),
    "WeightUpdateRatio:large": ("large_weight_update",),
    "WeightUpdateRatio:small": ("vanishing_gradient",),
}
THRESHOLD_TO_CODES = {"GlobalNormAbove100": ("exploding_gradient",), "GlobalNormBelow1e-7": ("vanishing_gradient",),
                      "LossAbove5xRollingMean": ("loss_spike",)}


def _first(steps: np.ndarray, mask: np.ndarray):
    mask = np.asarray(mask, dtype=bool)
    return int(steps[mask][0]) if mask.any() else None


def sagemaker_verdicts(d: RunData) -> dict[str, object]:
    """First step each SageMaker default rule fires on a run (None: never)."""
    out: dict[str, object] = {}
    numel = np.array([max(1, int(np.prod(s))) if len(s) else 1 for s in d.tensor_shape], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        mean_abs = math.sqrt(2 / math.pi) * d.grad_norm.astype(np.float64) / np.sqrt(numel)
        present = d.grad_nonfinite >= 0
        out["VanishingGradient"] = _first(d.steps, ((mean_abs < 1e-7) & present).any(axis=1)) if d.P else None
        weights_bad = ~np.isfinite(d.weight_norm).all(axis=1) if d.P else np.zeros(len(d.sample_steps), bool)
        bad = d.grad_bad | (~np.isfinite(d.loss) if d.loss_recorded else False)
        first_w = _first(d.sample_steps, weights_bad)
        first_g = _first(d.steps, bad)
        out["ExplodingTensor"] = min([s for s in (first_w, first_g) if s is not None], default=None)
        out["DeadRelu"] = _act_rule(d, {"relu", "relu6", "rnn_relu"}, 4)
        out["SaturatedActivation"] = _act_rule(d, {"sigmoid", "tanh"}, 2)
        loss = d.loss
        back = np.full(len(loss), np.nan)
        back[10:] = loss[:-10]
        out["LossNotDecreasing"] = _first(d.steps, loss >= back) if d.loss_recorded else None
        cols = [i for i, n in enumerate(d.tensors) if n.endswith("weight")]
        w = d.weight_at(d.update_steps)[:, cols].astype(np.float64)
        ratio = d.update_norm[:, cols].astype(np.float64) / (w + 1e-9)
        out["WeightUpdateRatio:large"] = _first(d.update_steps, (ratio > 10).any(axis=1)) if cols else None
        out["WeightUpdateRatio:small"] = _first(d.update_steps, (ratio < 1e-8).any(axis=1)) if cols else None
    return out


def _act_rule(d: RunData, kinds: set, col: int):
    cols = [j for j, k in enumerate(d.act_kinds) if k in kinds]
    if not cols or len(d.act_steps) == 0:
        return None
    with np.errstate(invalid="ignore"):
        return _first(d.act_steps, (d.act[:, cols, col] > 0.5).any(axis=1))


def threshold_verdicts(d: RunData) -> dict[str, object]:
    """First step each simple threshold monitor fires (None: never)."""
    g = d.global_norm.astype(np.float64)
    loss = d.loss
    with np.errstate(invalid="ignore"):
        roll = np.full(len(loss), np.nan)
        if len(loss) > 50:
            c = np.cumsum(np.where(np.isfinite(loss), loss, 0.0))
            n = np.cumsum(np.isfinite(loss))
            # mean of the 50 finite losses before t: (c[t-1] - c[t-51]) / (n[t-1] - n[t-51])
            lo_c, lo_n = np.concatenate([[0.0], c[:-51]]), np.concatenate([[0], n[:-51]])
            roll[50:] = (c[49:-1] - lo_c) / np.maximum(n[49:-1] - lo_n, 1)
        return {"GlobalNormAbove100": _first(d.steps, g > 100), "GlobalNormBelow1e-7": _first(d.steps, g < 1e-7),
                "LossAbove5xRollingMean": _first(d.steps, loss > 5 * roll)}


def verdict_codes(verdicts: dict[str, object], mapping: dict[str, tuple]) -> dict[str, int]:
    """{finding code: first step} implied by fired rules."""
    out: dict[str, int] = {}
    for rule, step in verdicts.items():
        if step is not None:
            for code in mapping[rule]:
                out[code] = min(out.get(code, step), step)
    return out
