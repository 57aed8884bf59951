"""Gradient rules: vanishing_gradient, exploding_gradient, nonfinite_gradient.

Each rule is a pure function (RunData, DiagnoseConfig) -> Finding | None over host arrays.
Ratios are gradient (or update) norm over weight norm per weight matrix, so layers of
different sizes compare fairly; see `RunData.eligible` for what is left out and why.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..core._amp import overflowed
from ..core._layers import NORM_NAMES
from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import (
    _r,
    activation_family,
    bad_input_steps,
    init_profile,
    large_update_mask,
    recurrent_state_nonfinite,
)
from ._findings import Finding
from ._robust import finite_max, finite_median, robust_z, row_median, running_median_mad, safe_log10, sustained


def _depth_drop(d: RunData) -> tuple[np.ndarray, int]:
    """Per step: median log ratio of the input-side quarter of layers minus the output-side quarter's."""
    lr = d.log_grad_ratio
    k = max(1, lr.shape[1] // 4)
    return row_median(lr[:, :k]) - row_median(lr[:, -k:]), k


def _fraction(mask: np.ndarray, judged: np.ndarray) -> float:
    n = int(judged.sum())
    return float((mask & judged).sum()) / n if n else 0.0


def _layer_medians(lr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return row_median(lr[rows].T) if rows.any() else np.full(lr.shape[1], np.nan)


# ------------------------------------------------------------------ vanishing
def vanishing_gradient(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """Depth-profile form (input side orders of magnitude below the output side) or everything-stalls form."""
    lr = d.log_grad_ratio
    E = lr.shape[1]
    if E == 0 or d.T == 0:
        return None
    ev: dict = {}
    forms = []
    depth_mask = np.zeros(d.T, dtype=bool)
    if E >= cfg.min_depth:
        drop, k = _depth_drop(d)
        judged = np.isfinite(drop)
        depth_mask = judged & (drop <= -cfg.vanish_depth_orders)
        if _fraction(depth_mask, judged) >= cfg.min_fraction:
            forms.append("depth_profile")
            ev["input_vs_output_orders"] = _r(float(np.median(drop[depth_mask])))
            ev["profile_layers_per_end"] = k
    stall_mask, stall_ev = _stall(d, cfg)
    if stall_mask.any():
        forms.append("everything_stalls")
        ev.update(stall_ev)
    if not forms:
        return None
    mask = depth_mask | stall_mask
    med = _layer_medians(lr, mask)
    ev["grad_weight_ratio_per_layer"] = {n: _r(10 ** m) for n, m in zip(d.names(d.eligible), med) if np.isfinite(m)}
    ev["forms"] = forms
    if "depth_profile" in forms:
        worst = np.flatnonzero(med <= finite_max(med[-max(1, E // 4):]) - cfg.vanish_depth_orders)
    else:
        worst = np.flatnonzero(med < math.log10(cfg.stall_grad_ratio) + 1)
    layers = d.names(d.eligible[worst]) if len(worst) else d.names(d.eligible[:1])
    cause, why = _vanishing_cause(d, cfg, layers)
    ev["reasoning"] = why
    first, last = d.step_range(mask)
    deep = "everything_stalls" in forms or ev.get("input_vs_output_orders", 0) <= -2 * cfg.vanish_depth_orders
    if "depth_profile" in forms:
        msg = (f"Gradients vanish toward the input: {layers[0]}'s gradient/weight ratio is "
               f"10^{-ev['input_vs_output_orders']:.1f} times smaller than the output side's.")
    else:
        msg = (f"Every layer's gradient is tiny next to its weights (median gradient/weight ratio "
               f"{ev['median_grad_weight_ratio']:.2g}): nothing learns.")
    return Finding("vanishing_gradient", "critical" if deep else "warning", first, last, tuple(layers), ev, cause, msg)


def _stall(d: RunData, cfg: DiagnoseConfig) -> tuple[np.ndarray, dict]:
    """Steps where all layers barely move, counted only while the loss is still near its start."""
    med = row_median(d.log_grad_ratio)
    level = d.initial_loss_level()
    if d.loss_recorded and np.isfinite(level) and level > 0:
        with np.errstate(invalid="ignore"):
            high = ~(d.loss_carried < cfg.stall_loss_level * level)  # NaN loss: cannot rule out a stall
    else:
        high = np.ones(d.T, dtype=bool)
    judged = np.isfinite(med)
    grad_stall = judged & (med < math.log10(cfg.stall_grad_ratio)) & high
    ev = {}
    if _fraction(grad_stall, judged) >= cfg.min_fraction:
        ev["median_grad_weight_ratio"] = _r(10 ** float(np.median(med[grad_stall])))
        return grad_stall, ev
    ur = d.log_update_ratio
    if ur.shape[1]:
        umed = row_median(ur)
        # Exactly zero updates mean the optimizer did not step (lr 0, skipped step), not a vanishing gradient.
        uj = np.isfinite(umed) & (umed > -29)
        idx = np.clip(np.searchsorted(d.steps, d.update_steps), 0, max(0, d.T - 1))
        # Tiny updates from healthy gradients are a learning-rate choice: the gradient must be small too.
        g_small = ~(med[idx] >= math.log10(cfg.stall_grad_ratio) + 1) if d.T else np.ones(len(idx), dtype=bool)
        u_stall = uj & (umed < math.log10(cfg.stall_update_ratio)) & g_small & (high[idx] if d.T else True)
        if _fraction(u_stall, uj) >= cfg.min_fraction:
            ev["median_update_weight_ratio"] = _r(10 ** float(np.median(umed[u_stall])))
            ev["median_grad_weight_ratio"] = _r(10 ** finite_median(med))
            return np.isin(d.steps, d.update_steps[u_stall]), ev
    return np.zeros(d.T, dtype=bool), ev


def _vanishing_cause(d: RunData, cfg: DiagnoseConfig, layers: list[str]) -> tuple[str, str]:
    rec = [n for n in layers if d.is_recurrent_tensor(d.tensors.index(n))]
    if rec:
        return "recurrence", (f"the vanishing layers include recurrent weights ({rec[0]}): backprop through time "
                              "multiplies one factor per time step")
    prof = init_profile(d, cfg)
    if prof.poor:
        return "initialization", "the initialization does not preserve signal size: " + "; ".join(prof.reasons)
    fam = activation_family(d)
    if fam in ("bounded", "mixed"):
        kinds = sorted({k for k in d.act_kinds if k in ("sigmoid", "tanh", "hardsigmoid", "softsign")})
        return "activation", (f"saturating activations ({', '.join(kinds) or 'bounded'}) multiply the gradient "
                              "by their derivative (sigmoid: at most 0.25) once per layer; the initialization keeps "
                              "activations in range")
    if d.has_residual:
        return _residual_vanishing_cause(d)
    if len(d.eligible) >= 10:
        return "depth", f"{len(d.eligible)} weight layers in a chain with healthy init and non-saturating activations"
    return "unknown", "no saturation, no init problem and no recurrence found in the recorded statistics"


def _residual_vanishing_cause(d: RunData) -> tuple[str, str]:
    """A residual net is not a plain chain: its skips carry the gradient past each block. Vanishing there
    comes from post-LN blocks (the norm after the add rescales the skip path too) trained without warmup."""
    blocks = sorted(d.residual or ())
    post = sorted(d.post_norm)
    if post and d.lr_warmup is not True:
        return "architecture", (f"{len(post)} post-LN residual blocks (e.g. {post[0]}: the norm comes after the add, "
                                "so it rescales the skip path too) trained without learning-rate warmup: the "
                                "gradients near the output are large at init and early steps at the full lr stall "
                                "the lower layers (Xiong et al. 2020)")
    return "unknown", (f"the model has {len(blocks)} residual blocks (e.g. {blocks[0]}), so depth alone does not "
                       "explain it; no saturation, init problem or recurrence found either")


# ------------------------------------------------------------------ exploding
def exploding_gradient(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """A rise far above the running baseline, grad/weight ratios far above 1, growth toward the input,
    or a run that ends non-finite (not because of its input)."""
    if d.T == 0:
        return None
    bad = d.grad_bad | d.loss_bad
    masks, ev = _exploding_forms(d, cfg, bad)
    first_bad = int(d.steps[bad][0]) if bad.any() else None
    ends_bad = bool(bad[-1]) and not (first_bad is not None and _input_bad_by(d, cfg, first_bad))
    if ends_bad:
        masks["nonfinite_end_state"] = bad
        ev["first_nonfinite_step"] = first_bad
    if not masks or (list(masks) == ["nonfinite_end_state"] and not _rose_before(d, cfg, first_bad)):
        return None  # a NaN out of a calm run is the non-finite rule's finding, not an explosion
    forms = list(masks)
    mask = np.logical_or.reduce(list(masks.values()))
    first, last = d.step_range(mask)
    ratio = masks.get("grad_weight_ratio", np.zeros(d.T, dtype=bool))
    layers = _exploding_layers(d, cfg, first, ratio, first_bad if ends_bad else None)
    cause, why = exploding_cause(d, cfg, first, layers, "growth_toward_input" in forms)
    ev["forms"] = forms
    ev["reasoning"] = why
    before = (first_bad is None or first < first_bad) and forms != ["nonfinite_end_state"]
    msg = ("Gradients explode" + (f" from step {first}" if before else "") +
           (f", before turning non-finite at step {first_bad}." if ends_bad and before
            else (f" and the run ends non-finite (first at step {first_bad})." if ends_bad else ".")))
    return Finding("exploding_gradient", "critical" if ends_bad or ratio.any() else "warning",
                   first, last, tuple(layers), ev, cause, msg)


def _exploding_forms(d: RunData, cfg: DiagnoseConfig, bad: np.ndarray) -> tuple[dict, dict]:
    """{form: step mask} for the forms that hold (besides the non-finite end state), and their evidence."""
    masks: dict[str, np.ndarray] = {}
    ev: dict = {}
    for name, (mask, form_ev) in (("rise_above_baseline", _global_rise(d, cfg, bad)),
                                  ("layer_rise_above_baseline", _layer_rise(d, cfg, bad))):
        if mask.any():
            masks[name] = mask
            ev.update(form_ev)
    lr = d.log_grad_ratio
    if lr.shape[1]:
        mx = np.max(np.where(np.isfinite(lr), lr, -np.inf), axis=1)
        ratio = sustained(mx >= math.log10(cfg.explode_grad_ratio), cfg.explode_min_steps, bad)
        if ratio.any():
            masks["grad_weight_ratio"] = ratio
            ev["max_grad_weight_ratio"] = _r(10 ** float(mx[ratio].max()))
    if lr.shape[1] >= cfg.min_depth:
        drop, _ = _depth_drop(d)
        judged = np.isfinite(drop)
        growth = judged & (drop >= cfg.explode_depth_orders)
        if _fraction(growth, judged) >= cfg.min_fraction:
            masks["growth_toward_input"] = growth
            ev["input_vs_output_orders"] = _r(float(np.median(drop[growth])))
    return masks, ev


def _loss_not_improving(d: RunData, cfg: DiagnoseConfig) -> np.ndarray:
    """Steps whose loss is not below its running median (or unknown). Gradients that rise while the
    loss falls are learning speeding up (a plateau ending), not an explosion."""
    if not d.loss_recorded:
        return np.ones(d.T, dtype=bool)
    loss = d.loss[d.given]  # the baseline counts losses, not steps: a loss every k-th step is enough
    med, _ = running_median_mad(loss, cfg.baseline_window, cfg.baseline_min)
    with np.errstate(invalid="ignore"):
        verdict = ~(loss < med)
    return d.carry_given(verdict, before=True)  # a step without a loss: the verdict of the last one


def _global_rise(d: RunData, cfg: DiagnoseConfig, bad: np.ndarray) -> tuple[np.ndarray, dict]:
    lg = safe_log10(d.global_norm)
    med, mad = running_median_mad(lg, cfg.baseline_window, cfg.baseline_min)
    above = lg - med
    z = robust_z(lg, med, mad, floor=0.05)
    start = finite_median(lg[: cfg.baseline_window])
    with np.errstate(invalid="ignore"):
        raw = ((above >= cfg.explode_rise_orders) & (z >= cfg.explode_z) & (lg - start >= cfg.explode_over_start_orders)
               & _loss_not_improving(d, cfg))
    raw = np.nan_to_num(raw, nan=0).astype(bool)
    mask = sustained(raw, cfg.explode_min_steps, bad)
    if not mask.any():
        return mask, {}
    i = int(np.flatnonzero(mask)[0])
    return mask, {"rise_first_step": int(d.steps[i]), "global_norm_at_rise": _r(d.global_norm[i]),
                  "baseline_global_norm": _r(10 ** med[i]), "orders_above_baseline": _r(above[i]),
                  "robust_z": _r(z[i]), "max_orders_above_baseline": _r(finite_max(above[mask]))}


def _layer_rise(d: RunData, cfg: DiagnoseConfig, bad: np.ndarray) -> tuple[np.ndarray, dict]:
    """Steps where some layer's gradient norm is orders above its own baseline (the median of its
    block medians over the previous three blocks of `baseline_window` steps) and its grad/weight
    ratio is at least `explode_layer_ratio`."""
    e = d.eligible
    B = cfg.baseline_window
    nb = d.T // B
    if len(e) == 0 or nb < 2:
        return np.zeros(d.T, dtype=bool), {}
    lg = d.log_grad.copy()
    lg[(lg <= -29) | ~np.isfinite(lg)] = np.nan  # exact zeros (behind a zero-initialised branch end) carry no scale
    srt = np.sort(lg[: nb * B].reshape(nb, B, len(e)), axis=1)  # NaN sorts last
    n = np.isfinite(srt).sum(axis=1)
    mid = np.clip((n - 1) // 2, 0, B - 1)
    block_med = np.take_along_axis(srt, mid[:, None, :], axis=1)[:, 0, :]
    block_med[n == 0] = np.nan
    prev = np.stack([np.roll(block_med, k, axis=0) for k in (1, 2, 3)], axis=2)  # [nb, E, 3]
    for k in (1, 2, 3):
        prev[:k, :, k - 1] = np.nan
    prev = np.sort(prev, axis=2)
    cnt = np.isfinite(prev).sum(axis=2)
    base = np.take_along_axis(prev, np.clip((cnt - 1) // 2, 0, 2)[:, :, None], axis=2)[:, :, 0]
    base[cnt == 0] = np.nan
    block_of = np.minimum(np.arange(d.T) // B, nb - 1)
    with np.errstate(invalid="ignore"):
        above = lg - base[block_of]
        big = d.log_grad_ratio >= math.log10(cfg.explode_layer_ratio)
        over_start = lg - block_med[0] >= cfg.explode_over_start_orders
        raw = ((above >= cfg.explode_rise_orders) & big & over_start).any(axis=1) & _loss_not_improving(d, cfg)
    mask = sustained(raw, cfg.explode_min_steps, bad)
    if not mask.any():
        return mask, {}
    i = int(np.flatnonzero(mask)[0])
    j = int(np.nanargmax(np.where(np.isfinite(above[i]), above[i], -np.inf)))
    return mask, {"layer_rise_first_step": int(d.steps[i]), "layer_rise_layer": d.tensors[int(e[j])],
                  "layer_orders_above_baseline": _r(above[i, j])}


def _exploding_layers(d: RunData, cfg: DiagnoseConfig, first: int, ratio: np.ndarray, first_bad) -> list[str]:
    """Layers most responsible: highest grad/weight ratio at the first flagged step, or non-finite ones."""
    if first_bad is not None and first >= first_bad:
        return nonfinite_layers(d, first_bad)
    lr = d.log_grad_ratio
    t = int(np.searchsorted(d.steps, first))
    if lr.shape[1] and t < d.T and np.isfinite(lr[t]).any():
        row = np.where(np.isfinite(lr[t]), lr[t], -np.inf)
        order = np.argsort(-row)[: max(1, min(5, len(row) // 2))]
        return d.names(d.eligible[order])
    return nonfinite_layers(d, first_bad) if first_bad is not None else []


def exploding_cause(d: RunData, cfg: DiagnoseConfig, first: int, layers: list[str], growth: bool) -> tuple[str, str]:
    """Cause of an explosion that starts at `first`, with the reasoning."""
    if _input_bad_by(d, cfg, first):
        return "data", f"the input batch at step {first} was an outlier or non-finite"
    if d.recurrent_modules:
        return "recurrence", (f"the model has recurrent layers ({', '.join(d.recurrent_modules[:3])}): "
                              "backprop through time multiplies the recurrent weight once per time step")
    prof = init_profile(d, cfg)
    grows = np.isfinite(prof.std_orders) and prof.std_orders >= cfg.init_std_orders
    if grows or (np.isfinite(prof.gain_orders) and prof.gain_orders >= cfg.init_gain_orders) or \
            (first <= cfg.init_max_step // 5 and prof.poor):
        return "initialization", ("the initialization amplifies signals: "
                                  + "; ".join(prof.reasons or ["large weights at step 0"]))
    if first <= cfg.init_max_step // 5 and len(d.eligible) >= 10 and not d.has_residual:
        norms = sorted({c for c in d.modules.values() if c in NORM_NAMES})
        return "depth", (f"gradients are already far above their weights at the start in a chain of {len(d.eligible)} "
                         "weight layers" + (f" with {', '.join(norms)} (without skips, normalization layers amplify "
                                            "gradients toward the input at init; Yang et al. 2019)" if norms else ""))
    big = large_update_mask(d, cfg)
    upd = d.update_steps[big & (d.update_steps <= first)]
    if len(upd):
        lr = d.meta.get("lr")
        return "learning_rate", ("updates were large before the rise (median update/weight ratio above "
                                 f"{cfg.large_update_ratio} at step {int(upd[-1])}"
                                 + (f", initial lr={lr}" if lr else "") + ") while the first steps were healthy")
    if d.has_residual:  # skips carry the signal: not a plain chain, and the init was judged healthy above
        return "learning_rate", (f"the model has {len(d.residual or ())} residual blocks (skips, not a plain chain) "
                                 "and its initialization looks healthy: the step size is the usual trigger")
    if growth:
        return "depth", "gradients grow layer by layer toward the input"
    if first > cfg.init_max_step:
        return "learning_rate", ("training was stable for the first steps, then gradients rose: "
                                 "the step size is the usual trigger")
    return "unknown", "no input outlier, recurrence, init problem or large update found before the rise"


def _input_bad_by(d: RunData, cfg: DiagnoseConfig, step: int) -> bool:
    """True if an input batch at `step` (or the step before) was an outlier or non-finite."""
    s = bad_input_steps(d, cfg)
    return bool(((s <= step) & (s >= step - 1)).any())


# ------------------------------------------------------------------ non-finite
def nonfinite_layers(d: RunData, step: int) -> list[str]:
    """Tensors with NaN/Inf gradients (or an overflowing norm) at `step`, in backward order (output side first)."""
    t = int(np.searchsorted(d.steps, step))
    if t >= d.T or d.P == 0:
        return []
    # NaN/Inf entries, or finite entries whose norm overflowed float32
    bad = (d.grad_nonfinite[t] > 0) | ((d.grad_nonfinite[t] >= 0) & ~np.isfinite(d.grad_norm[t]))
    idx = np.flatnonzero(bad)[::-1]
    return [d.tensors[i] for i in idx]


def nonfinite_gradient(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """The first non-finite step, the first layers, and whether the input or the loss went bad first.

    In a run watched with a GradScaler, the steps it skipped for an overflow of its loss scale
    alone are not here (see `RunData.without_scale_overflows`); without any other non-finite
    step they make a note of their own (`scale_overflows`).
    """
    bad = d.grad_bad | d.loss_bad
    if not bad.any():
        return scale_overflows(d, cfg)
    first = int(d.steps[bad][0])
    steps_bad = d.steps[bad]
    in_bad = d.input_bad_steps
    in_first = int(in_bad[0]) if len(in_bad) else None
    loss_first = int(d.steps[d.loss_bad][0]) if d.loss_bad.any() else None
    grad_first = int(d.steps[d.grad_bad][0]) if d.grad_bad.any() else None
    if in_first is not None and in_first <= first:
        which = "input"
    elif loss_first is not None and (grad_first is None or loss_first < grad_first or loss_first == first):
        which = "loss" if grad_first is None or loss_first < grad_first else "loss_and_gradient"
    else:
        which = "gradient"
    layers = nonfinite_layers(d, grad_first) if grad_first is not None else []
    ev = {"first_step": first, "first_nonfinite": which, "input_first_nonfinite_step": in_first,
          "loss_first_nonfinite_step": loss_first, "gradient_first_nonfinite_step": grad_first,
          "nonfinite_steps": int(bad.sum()), "recovered": not bool(bad[-1]),
          "layers_nonfinite_at_first_step": len(layers), "layers_total": d.P}
    if len(d.amp_steps):
        overflow_in_bad = int(np.isin(d.steps[bad], d.amp_overflow_steps).sum())
        ev["amp_scale_overflow_steps"] = len(d.amp_overflow_steps) - overflow_in_bad
    if which == "input":
        cause, why = "data", (f"the input batch held NaN/Inf at step {in_first}, "
                              "before or with the first non-finite gradient")
    else:
        cause, why = _nonfinite_cause(d, cfg, first, which)
    ev["reasoning"] = why
    said = {"input": "the input batch", "loss": "the loss", "loss_and_gradient": "the loss and gradients together",
            "gradient": "the gradients, with a finite loss"}[which]
    msg = (f"NaN/Inf first at step {first} (first in {said})" +
           (f"; output-most bad tensor: {layers[0]}" if layers else "") +
           ("; the run never recovered." if not ev["recovered"] else f"; {ev['nonfinite_steps']} bad step(s) in all."))
    return Finding("nonfinite_gradient", "critical", first, int(steps_bad[-1]), tuple(layers[:10]), ev, cause, msg)


def scale_overflows(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """A GradScaler's skipped steps: info while it calibrates its scale, a warning or critical if it never settles."""
    skipped = d.amp_overflow_steps
    if len(skipped) == 0:
        return None
    scale, overflow = d.amp[:, 0].astype(np.float64), overflowed(d.amp)
    n = len(d.amp_steps)
    # Calibration: the overflows from the first step on, while the scale halves down to one that fits.
    calibration = int(np.argmin(overflow)) if not overflow.all() else n
    after = overflow[calibration:]
    fraction = float(after.mean()) if len(after) else 1.0
    low = float(np.nanmin(scale))
    ev: dict = {"amp_scale_overflow_steps": int(len(skipped)), "amp_steps": n, "calibration_steps": calibration,
                "overflow_fraction_after_calibration": round(fraction, 4) if len(after) else None,
                "first_scale": float(scale[0]), "last_scale": float(scale[-1]), "min_scale": low}
    if (len(after) and fraction > cfg.amp_stalled_fraction) or (not len(after) and low < cfg.amp_min_scale):
        severity, why = "critical", ("it skipped nearly every step, even at a scale below 1, so training has all "
                                     "but stopped: the gradients overflow whatever the scale")
    elif len(after) and (fraction > cfg.amp_overflow_fraction or low < cfg.amp_min_scale):
        severity, why = "warning", (f"its scale never settled (lowest {low:g}; {fraction:.1%} of the steps after "
                                    "calibration skipped): the gradients overflow float16 even when barely scaled")
    else:
        severity, why = "info", "expected while it calibrates its scale; nothing to do"
    ev["reasoning"] = why
    ev["action_needed"] = severity != "info"
    first, last = int(skipped[0]), int(skipped[-1])
    msg = (f"{len(skipped)} of {n} steps overflowed the AMP loss scale and were skipped by the GradScaler "
           f"(scale {scale[0]:g} -> {scale[-1]:g}): " + why + ".")
    return Finding("nonfinite_gradient", severity, first, last, (), ev, "unknown", msg)


def _rose_before(d: RunData, cfg: DiagnoseConfig, first: Optional[int]) -> bool:
    """Whether gradients rose, or stood far above their weights, before step `first` (the first non-finite one).

    Besides the rise rules' sustained rise: a last finite global norm `explode_rise_orders` above the median
    of the ones before it (a blow-up within a step or two). Fewer than two finite steps before: not known,
    so True.
    """
    before = d.steps < (d.steps[-1] + 1 if first is None else first)
    lg = safe_log10(d.global_norm[before].astype(np.float64))
    lg = lg[np.isfinite(lg)]
    if len(lg) < 2:
        return True
    rise, _ = _global_rise(d, cfg, d.grad_bad | d.loss_bad)
    lr = d.log_grad_ratio
    high = bool(lr.shape[1]) and bool(finite_max(lr[before]) >= math.log10(cfg.explode_grad_ratio))
    jump = bool(lg[-1] - np.median(lg[:-1]) >= cfg.explode_rise_orders)
    return bool(rise[before].any()) or high or jump


def _nonfinite_cause(d: RunData, cfg: DiagnoseConfig, first: int, which: str) -> tuple[str, str]:
    if _rose_before(d, cfg, first):
        cause, why = exploding_cause(d, cfg, first, [], False)
        return cause, "gradients rose, or were far above their weights, before going non-finite; " + why
    state = recurrent_state_nonfinite(d)  # the input batches were finite (else the cause is data, above)
    if state is not None:
        return "recurrence", (f"{state[0]}'s output held NaN/Inf at step {state[1]} while its input and the "
                              "input batches were finite: the recurrent state it carries went non-finite")
    if which == "loss":
        return "unknown", ("the loss went non-finite with no rise in gradients before it "
                           "(check the loss for log(0) or division by zero)")
    return "unknown", ("gradients went non-finite with a finite input and no rise before "
                       "(check for sqrt/log/division at 0 in the model)")
