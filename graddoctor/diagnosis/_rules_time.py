"""Vanishing through time: the part of `vanishing_gradient` that per-parameter norms cannot see.

Reads the `time_grad` series (graddoctor.core._rnn_time): on sampled steps, the norm of the last time
step's gradient carried back through a recurrent layer to log-spaced earlier steps. Its ratio at the
first step to the last is the through-time gain over the sequence; in sequence classification it is
dL/dh_1 over dL/dh_T, in a language model the long-range part of it (the last position's loss).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import numpy as np

from ..store._series import TIME_FIELDS
from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import _r
from ._findings import Finding

_MODULE, _SEQ_LEN, _LAST = (TIME_FIELDS.index(f) for f in ("module", "seq_len", "grad_lag0"))
_FIRST = len(TIME_FIELDS) - 1  # the last lag column: lag T - 1, the first step
# float32's smallest subnormal: a first-step norm of exactly 0 is below it, so its orders are floored here.
_FLOOR = 1.4e-45


def through_time_ratio(d: RunData) -> np.ndarray:
    """float64[R]: each sample's first-step norm over its last-step norm (NaN where either is non-finite or
    the last is 0: nothing was carried back)."""
    if len(d.time_steps) == 0:
        return np.zeros(0)
    last, first = d.time_grad[:, _LAST].astype(np.float64), d.time_grad[:, _FIRST].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = first / last
    return np.where(np.isfinite(r) & (last > 0), r, np.nan)


def vanishing_through_time(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """`vanishing_gradient` (cause recurrence) when, on at least `min_fraction` of the judged samples, the last
    step's gradient reaches the first step `vanish_time_orders` or more orders smaller. A sample is judged
    while the loss is still above `stall_loss_level` of its start: a model that learns well needs no more
    memory than it has (a language model's near context), so its short gradient memory is no problem."""
    ratio = through_time_ratio(d)
    if not len(ratio):
        return None
    orders = np.log10(np.maximum(ratio, _FLOOR))
    judged = np.isfinite(orders) & _loss_still_high(d, cfg)
    vanished = judged & (orders <= -cfg.vanish_time_orders)
    if not judged.any() or vanished.sum() < cfg.min_fraction * judged.sum():
        return None
    rows = d.time_grad[vanished]
    module = _module_name(d, rows)
    median = float(np.median(ratio[vanished]))
    med_orders = float(np.median(orders[vanished]))
    T = int(np.median(rows[:, _SEQ_LEN]))
    layers = tuple(t for t in d.tensors if t.startswith(module + ".weight_hh")) or (module,)  # the recurrent weights
    ev = {"forms": ["through_time"], "through_time_ratio": float(f"{median:.3g}"),
          "through_time_orders": _r(med_orders), "seq_len": T, "time_module": module,
          "time_samples": int(judged.sum()), "time_samples_vanishing": int(vanished.sum()),
          "reasoning": (f"backprop through time multiplies one Jacobian per step: over the {T} steps of {module} the "
                        f"last step's gradient reaches the first 10^{med_orders:.1f} times as large, below "
                        f"float32's resolution of the later steps' shares (1e-{cfg.vanish_time_orders:g}), "
                        "so what the first inputs decide is not learned")}
    steps = d.time_steps[vanished]
    msg = (f"Gradients vanish through time in {module}: the last step's gradient reaches the first of {T} steps "
           f"10^{-med_orders:.1f} times smaller.")
    severity = "critical" if med_orders <= -2 * cfg.vanish_time_orders else "warning"
    return Finding("vanishing_gradient", severity, int(steps[0]), int(steps[-1]), layers, ev, "recurrence", msg)


def merge_through_time(depth: Optional[Finding], time: Optional[Finding]) -> Optional[Finding]:
    """One `vanishing_gradient` finding from the per-layer rule's and the through-time rule's: when both
    hold, the through-time evidence names the cause (recurrence), and the forms and evidence are joined."""
    if depth is None or time is None:
        return depth or time
    ev = dict(depth.evidence, **{k: v for k, v in time.evidence.items() if k != "forms"})
    ev["forms"] = list(depth.evidence.get("forms", [])) + ["through_time"]
    severity = max(depth, time, key=lambda f: f.rank).severity
    return replace(depth, severity=severity, first_step=min(depth.first_step, time.first_step),
                   last_step=max(depth.last_step, time.last_step),
                   layers=tuple(dict.fromkeys(time.layers + depth.layers)), evidence=ev, cause="recurrence",
                   message=f"{depth.message} {time.message}")


def _loss_still_high(d: RunData, cfg: DiagnoseConfig) -> np.ndarray:
    """bool[R]: the samples taken while the loss was above `stall_loss_level` of its start (all, without a loss)."""
    level = d.initial_loss_level()
    if not d.loss_recorded or not math.isfinite(level) or level <= 0 or d.T == 0:
        return np.ones(len(d.time_steps), dtype=bool)
    idx = np.clip(np.searchsorted(d.steps, d.time_steps), 0, d.T - 1)
    with np.errstate(invalid="ignore"):
        return ~(d.loss_carried[idx] < cfg.stall_loss_level * level)  # a NaN loss cannot rule it out


def _module_name(d: RunData, rows: np.ndarray) -> str:
    """The recurrent module most of the vanishing samples came from (its name from the run's metadata)."""
    idx = rows[:, _MODULE]
    idx = idx[np.isfinite(idx)].astype(np.int64)
    if not len(idx):
        return "the recurrent layer"
    k = int(np.bincount(idx).argmax())
    return d.time_modules[k] if 0 <= k < len(d.time_modules) else f"recurrent module {k}"
