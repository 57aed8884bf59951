"""Loss and update rules: loss_spike, loss_not_decreasing, large_weight_update, input_outlier.

Pure functions (RunData, DiagnoseConfig) -> Finding | None. Running baselines are the
median/MAD of the previous `baseline_window` steps (Hampel 1974), so minibatch noise
raises the bar and a single bad batch does not move it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ._config import DiagnoseConfig
from ._data import RunData, initial_level
from ._evidence import _r, init_profile, input_flags, large_update_mask, scale_invariant_optimizer
from ._findings import Finding
from ._robust import block_medians, finite_max, robust_z, row_median, running_median_mad, trend_test
from ._rules_gradient import exploding_cause
from ._rules_init import uniform_loss_level
from ._rules_transformer import update_spike_before


def _steps_list(steps: np.ndarray, limit: int = 20) -> list[int]:
    return [int(s) for s in steps[:limit]]


def spike_mask(loss: np.ndarray, cfg: DiagnoseConfig, start: Optional[float] = None,
               early: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one loss-spike detector (diagnose, the report and the dashboard all use it).

    A finite loss is a spike when it is `spike_z` robust deviations (median/MAD of the preceding
    losses) above the running median, at least `spike_factor` times it, and at least
    `spike_min_jump` times the starting loss level above it. Before that running baseline exists
    (the first `spike_min_history` losses), a loss `early_spike_factor` times above the start level
    (`early_lm_spike_factor` times for a language model, whose start level is a uniform guess) is a spike
    too (an explosion in the first steps has no history to stand out from).

    Args:
      loss: float[n], the losses in step order (only steps that have one; NaN/Inf are never spikes).
      start: the start level for early spikes: the step-0 loss, raised to `start` when given (a language
        model's ln(vocab), see `uniform_loss_level`).
      early: False when `loss` does not begin at the run's first step (a live window past it).
    Returns:
      (spike bool[n], baseline float64[n]: the running median, or the start level at early spikes,
       robust z float64[n]: NaN at early spikes).
    """
    loss = np.asarray(loss, dtype=np.float64).reshape(-1)
    n = len(loss)
    spike, med, z = np.zeros(n, dtype=bool), np.full(n, np.nan), np.full(n, np.nan)
    if n >= cfg.spike_min_history + 1:
        med, mad = running_median_mad(loss, max(cfg.baseline_window, cfg.spike_min_history), cfg.spike_min_history)
        z = robust_z(loss, med, mad, floor=1e-12)
        level = initial_level(loss)
        floor = cfg.spike_min_jump * abs(level) if np.isfinite(level) else 0.0
        with np.errstate(invalid="ignore"):
            jump = loss - med
            spike = (np.isfinite(loss) & (z >= cfg.spike_z) & (jump >= (cfg.spike_factor - 1) * np.abs(med))
                     & (jump >= floor))
        spike = np.nan_to_num(spike, nan=0).astype(bool)
    if early:
        first, base = _early_spikes(loss, cfg, start)
        spike |= first
        med = np.where(first, base, med)
    return spike, med, z


def _early_spikes(loss: np.ndarray, cfg: DiagnoseConfig, start: Optional[float]) -> tuple[np.ndarray, float]:
    """(bool[n], start level): the first `spike_min_history` losses that are `early_spike_factor` times
    above the start level (the first finite loss, or `start` when that is higher)."""
    out = np.zeros(len(loss), dtype=bool)
    finite = np.flatnonzero(np.isfinite(loss))
    if not len(finite):
        return out, float("nan")
    base = float(loss[finite[0]])
    if start is not None and np.isfinite(start):
        base = max(base, float(start))
    if base <= 0:  # a ratio to a non-positive level says nothing
        return out, base
    head = slice(0, cfg.spike_min_history)
    # a language model's start level is a uniform guess: twice that is already far worse than chance
    factor = cfg.early_lm_spike_factor if start is not None and np.isfinite(start) else cfg.early_spike_factor
    with np.errstate(invalid="ignore"):
        out[head] = np.isfinite(loss[head]) & (loss[head] >= factor * base)
    return out, base


def loss_spike(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Finite losses far above their running median (robustly, and by a factor), or, in the first steps,
    far above where the run started."""
    given = d.given  # baselines count the given losses, so a loss every k-th step is judged alike
    if not given.any():
        return None
    loss, d_steps = d.loss[given], d.steps[given]
    uniform = uniform_loss_level(d)
    spike, med, z = spike_mask(loss, cfg, uniform, early=_at_run_start(d))
    scale = np.abs(med)
    if not spike.any():
        return None
    steps = d_steps[spike]
    worst = int(np.argmax(np.where(spike, loss / np.maximum(scale, 1e-12), -np.inf)))
    outlier, nonfinite, _ = input_flags(d, cfg)
    bad_in = set(d.input_steps[outlier | nonfinite].tolist())
    with_input = [int(s) for s in steps if int(s) in bad_in]
    big = d.update_steps[large_update_mask(d, cfg)]
    if with_input:
        cause, why = "data", f"spike step(s) {with_input[:5]} coincide with outlier input batches"
    elif len(big) and (big <= steps[0] + 1).any():
        cause, why = "learning_rate", (f"large updates (update/weight above {cfg.large_update_ratio}) "
                                       "came before the spike")
    else:
        cause, why = "unknown", "no outlier input and no large update recorded at the spike steps"
    early = bool(np.isnan(z[worst]))
    ev = {"spike_steps": _steps_list(steps), "spikes": int(spike.sum()), "worst_step": int(d_steps[worst]),
          "worst_loss": _r(loss[worst]), "running_median_at_worst": _r(med[worst]), "robust_z_at_worst": _r(z[worst]),
          "reasoning": why}
    preceded = update_spike_before(d, cfg, int(steps[0]))  # a layer's update/weight ratio spiked just before
    if preceded is not None:
        ev["preceded_by_update_spike"] = preceded
    if early:
        ev["early_explosion"] = {"start_level": _r(med[worst]), "factor": _r(loss[worst] / med[worst]),
                                 "uniform_loss_ln_vocab": _r(uniform) if uniform is not None else None}
        against = (f"{med[worst]:.3g}, where the run started"
                   + (f" (ln(vocab) = {uniform:.3g}, the loss of a uniform prediction)" if uniform else ""))
    else:
        against = f"a running median of {med[worst]:.3g}"
    msg = (f"The loss {'exploded in the first steps' if early else 'spiked'} ({int(spike.sum())} spike(s)); "
           f"worst at step {int(d_steps[worst])}: {loss[worst]:.3g} against {against}.")
    return Finding("loss_spike", "warning", int(steps[0]), int(steps[-1]), (), ev, cause, msg)


# Keys a live diagnosis adds to a window's `RunData.meta`, so that rules judging a window see where the
# whole run started (the final diagnose reads the same from the run's own first steps).
RUN_FIRST_STEP = "run_first_step"
RUN_START_LEVEL = "run_start_loss_level"


def _at_run_start(d: RunData) -> bool:
    """Whether `d` holds the run's first step (a live window that dropped it judges no early spikes)."""
    first = d.meta.get(RUN_FIRST_STEP)
    return first is None or (d.T > 0 and int(d.steps[0]) <= int(first))


def start_loss_level(d: RunData) -> float:
    """Where the run's loss started: the median of its first 10 finite losses (live: carried from the run's start)."""
    level = d.meta.get(RUN_START_LEVEL)
    return float(level) if level is not None else initial_level(d.loss[d.given])


def loss_not_decreasing(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Rank trend test: the recent half shows no significant decrease, and the run made little progress
    overall (no significant decrease over the whole run) or the loss is now significantly rising."""
    ok = np.isfinite(d.loss)
    if not d.loss_recorded or ok.sum() < cfg.trend_min_steps:
        return None
    steps, loss = d.steps[ok].astype(np.float64), d.loss[ok]
    t_all, y_all = _reduce(steps, loss, cfg.trend_max_points)
    half = len(steps) // 2
    t_rec, y_rec = _reduce(steps[half:], loss[half:], cfg.trend_max_points)
    rho_all, p_dec_all, _ = trend_test(t_all, y_all)
    rho_rec, p_dec_rec, p_inc_rec = trend_test(t_rec, y_rec)
    if p_dec_rec < cfg.trend_p:
        return None
    if _converged(d, loss, cfg):
        return None
    rising = p_inc_rec < cfg.trend_p
    if p_dec_all < cfg.trend_p and not rising:
        return None
    start, end = start_loss_level(d), float(np.median(loss[-max(10, len(loss) // 10):]))
    ev = {"window_steps": [int(steps[half]), int(steps[-1])], "spearman_rho_recent": _r(rho_rec),
          "p_decreasing_recent": _r(p_dec_rec), "p_increasing_recent": _r(p_inc_rec),
          "spearman_rho_whole_run": _r(rho_all), "p_decreasing_whole_run": _r(p_dec_all),
          "start_loss_median": _r(start), "recent_loss_median": _r(end)}
    if rising:
        cause, why = "learning_rate", "the loss rises significantly over the recent window: steps overshoot"
    else:
        cause, why = "unknown", "no significant downward trend; see the other findings for what stops learning"
    ev["reasoning"] = why
    msg = (f"The loss is {'rising' if rising else 'not decreasing'} (rank trend over steps {int(steps[half])}-"
           f"{int(steps[-1])}: rho={rho_rec:.2f}, p={p_dec_rec:.2g} for a decrease); median {start:.3g} -> {end:.3g}.")
    return Finding("loss_not_decreasing", "warning", int(steps[half]), int(steps[-1]), (), ev, cause, msg)


def _converged(d: RunData, loss: np.ndarray, cfg: DiagnoseConfig) -> bool:
    """The loss already fell `converged_fall` times below where the run started (a language model starts at
    ln(vocab) at least): a flat tail is the floor it reached, not a stall (the final diagnose and the live
    windows use the same start level)."""
    start, uniform = start_loss_level(d), uniform_loss_level(d)
    if uniform is not None and not start >= uniform:  # NaN start (no finite loss at the start) too
        start = uniform
    recent = float(np.median(loss[-max(10, len(loss) // 10):]))
    return bool(np.isfinite(start) and start > 0 and recent * cfg.converged_fall <= start)


def _reduce(t: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    idx, med = block_medians(y, max_points)
    if len(med) == len(y):
        return t, y
    return np.interp(idx, np.arange(len(t)), t), med


def large_weight_update(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Sampled updates whose median update/weight ratio over layers is above `large_update_ratio`."""
    big = large_update_mask(d, cfg)
    if not big.any():
        return None
    ur = d.log_update_ratio
    rows = np.flatnonzero(big)
    peak = np.max(np.where(np.isnan(ur[rows]), -np.inf, ur[rows]), axis=0)
    order = np.argsort(-peak)
    layers = [d.tensors[int(d.eligible[i])] for i in order[:5]]
    med = row_median(np.where(np.isinf(ur), np.nan, ur))
    steps = d.update_steps[big]
    outlier, nonfinite, _ = input_flags(d, cfg)
    bad_in = set(d.input_steps[outlier | nonfinite].tolist())
    if any(int(s) in bad_in for s in steps):
        cause, why = "data", "the large updates were taken on outlier input batches"
    elif scale_invariant_optimizer(d) and not init_profile(d, cfg).poor:
        # Adam and kin move each weight by about lr per step whatever the gradient: with a sound init, an
        # update that is a large fraction of the weights is the learning rate, from the first step or not.
        cause, why = "learning_rate", (f"{d.meta.get('optimizer')} moves each weight by about the learning rate per "
                                       f"step, whatever the gradient (initial lr={d.meta.get('lr')}), and the "
                                       "initialization looks sound: the step size is too large for these weights")
    elif int(steps[0]) <= cfg.init_max_step // 5:  # from the very start: the model, not the step size
        cause, why = exploding_cause(d, cfg, int(steps[0]), [], False)
        why = f"updates were large from step {int(steps[0])}: " + why
    else:
        cause, why = "learning_rate", ("the update is a large fraction of the weight itself (Karpathy's rule of thumb "
                                       "is ~1e-3): the step size is too large for these weights")
    finite = np.isfinite(med[big])
    ev = {"update_steps": _steps_list(steps), "samples": int(big.sum()), "samples_total": len(d.update_steps),
          "max_median_update_weight_ratio": _r(10 ** float(np.max(med[big][finite]))) if finite.any() else float("inf"),
          "peak_update_weight_ratio_per_layer": {layers[i]: _r(10 ** peak[order[i]]) for i in range(len(layers))},
          "initial_lr": d.meta.get("lr"), "reasoning": why}
    msg = (f"Weights change a lot per step: the median update/weight ratio exceeded {cfg.large_update_ratio} at "
           f"{int(big.sum())} of {len(d.update_steps)} sampled steps (first at step {int(steps[0])}).")
    return Finding("large_weight_update", "warning", int(steps[0]), int(steps[-1]), tuple(layers), ev, cause, msg)


def input_outlier(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Input batches with NaN/Inf, or with max-abs orders of magnitude above the running median."""
    outlier, nonfinite, above = input_flags(d, cfg)
    flagged = outlier | nonfinite
    if not flagged.any():
        return None
    steps = d.input_steps[flagged]
    ev = {"outlier_steps": _steps_list(d.input_steps[outlier]),
          "nonfinite_steps": _steps_list(d.input_steps[nonfinite]),
          "max_orders_above_median": _r(finite_max(above[outlier])) if outlier.any() else None,
          "reasoning": "input statistics are recorded before the model sees the batch, so the data is the source"}
    if outlier.any():
        i = int(np.flatnonzero(outlier)[0])
        ev["first_outlier_maxabs"] = _r(d.inputs[i, 0])
        ev["first_outlier_std"] = _r(d.inputs[i, 3])
        ev["first_outlier_orders_above_median"] = _r(above[i])
    parts = []
    if nonfinite.any():
        parts.append(f"{int(nonfinite.sum())} input batch(es) held NaN/Inf "
                     f"(first at step {int(d.input_steps[nonfinite][0])})")
    if outlier.any():
        parts.append(f"{int(outlier.sum())} batch(es) had max |x| or std up to "
                     f"10^{ev['max_orders_above_median']:.1f} times the usual")
    return Finding("input_outlier", "critical" if nonfinite.any() else "warning", int(steps[0]), int(steps[-1]), (),
                   ev, "data", "; ".join(parts) + ".")
