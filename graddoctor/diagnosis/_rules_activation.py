"""Activation and initialization rules: saturated_activation, dead_relu, poor_initialization.

They read the sampled activation statistics (`watch(activation_every=k)`): the fraction of
outputs near a bound for bounded activations, the fraction of units that are zero over the
whole batch for the ReLU family, and the std per layer for the start-of-training profile.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Optional

import numpy as np

from ..core._layers import BOUNDED_KINDS, EXACT_ZERO_KINDS
from ._config import DiagnoseConfig
from ._data import ACT_DEAD, ACT_SAT, RunData
from ._evidence import _r, fitting_init, init_profile, large_update_mask, weight_scales
from ._findings import Finding
from ._robust import finite_mean


@dataclass(frozen=True)
class _Persistent:
    """Activation modules whose statistic stays over a threshold, and where that happened."""

    means: dict  # module name -> mean of the statistic over its finite samples
    first: int   # first sampled step with a module over the threshold
    last: int    # last such step
    at_first_sample: bool  # already over the threshold at the first sample


def _persistent(d: RunData, kinds: AbstractSet[str], col: int, threshold: float,
                min_fraction: float) -> Optional[_Persistent]:
    """Modules of the given kinds whose statistic exceeds `threshold` on >= min_fraction of finite samples."""
    if len(d.act_steps) == 0 or d.act.ndim != 3 or d.act.shape[1] != len(d.act_modules):
        return None
    cols = [j for j, k in enumerate(d.act_kinds) if k in kinds]
    if not cols:
        return None
    x = d.act[:, cols, col].astype(np.float64)
    finite = np.isfinite(x)
    over = finite & (x > threshold)
    n = finite.sum(axis=0)
    frac = np.where(n > 0, over.sum(axis=0) / np.maximum(n, 1), 0.0)
    sel = np.flatnonzero(frac >= min_fraction)
    if not len(sel):
        return None
    rows = over[:, sel].any(axis=1)
    means = {d.act_modules[cols[i]]: _r(finite_mean(x[:, i])) for i in sel}
    return _Persistent(means, int(d.act_steps[rows][0]), int(d.act_steps[rows][-1]), bool(over[0, sel].any()))


def saturated_activation(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    hit = _persistent(d, BOUNDED_KINDS, ACT_SAT, cfg.saturated_fraction, cfg.min_fraction)
    if hit is None:
        return None
    first, last, mean_sat = hit.first, hit.last, hit.means
    mods = list(mean_sat)
    prof = init_profile(d, cfg)
    scales = weight_scales(d)
    big_w = {n: s for n, s in scales.items() if s > 2.0}
    if first <= cfg.init_max_step and (prof.poor or big_w):
        cause = "initialization"
        why = (f"saturated from the first sample (step {first}); weight scale RMS*sqrt(fan_in) "
               f"{'up to %.3g' % max(big_w.values()) if big_w else 'normal'} (Xavier: ~1) "
               "drives pre-activations into the flat tails")
    elif large_update_mask(d, cfg).any():
        cause, why = "learning_rate", "saturation set in after large weight updates pushed pre-activations out"
    else:
        cause, why = "activation", "bounded activations sit in their flat tails, where the derivative is ~0"
    ev = {"mean_saturated_fraction": mean_sat, "samples": int(len(d.act_steps)), "weight_scales": scales,
          "reasoning": why}
    worst = max(mean_sat, key=lambda m: mean_sat[m])
    msg = (f"{len(mods)} bounded activation layer(s) saturated (worst {worst}: {mean_sat[worst]:.0%} of outputs near a "
           "bound); their derivative is ~0 there, so gradients vanish through them.")
    sev = "critical" if max(mean_sat.values()) > 0.9 else "warning"
    return Finding("saturated_activation", sev, first, last, tuple(mods), ev, cause, msg)


def dead_relu(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    hit = _persistent(d, EXACT_ZERO_KINDS, ACT_DEAD, cfg.dead_fraction, cfg.min_fraction)
    if hit is None:
        return None
    first, last, dead = hit.first, hit.last, hit.means
    big = large_update_mask(d, cfg)
    at_start = hit.at_first_sample and int(d.act_steps[0]) <= cfg.init_max_step
    if at_start:
        cause, why = "initialization", (f"units were dead from the first sample (step {int(d.act_steps[0])}): "
                                        "weights/biases put pre-activations below zero for every input")
    elif big.any() and (d.update_steps[big] <= last).any():
        cause, why = "learning_rate", "units died after large weight updates pushed their biases negative"
    else:
        cause, why = "activation", "ReLU units that go negative for every input get no gradient and never recover"
    ev = {"mean_dead_unit_fraction": dead, "samples": int(len(d.act_steps)), "reasoning": why}
    worst = max(dead, key=lambda m: dead[m])
    msg = (f"{len(dead)} ReLU layer(s) have mostly dead units (worst {worst}: {dead[worst]:.0%} of units zero "
           "for the whole batch); dead units pass no gradient.")
    return Finding("dead_relu", "critical" if max(dead.values()) > 0.9 else "warning", first, last,
                   tuple(dead), ev, cause, msg)


def poor_initialization(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """The first steps' activation-variance profile (or weight scales without activations) across depth."""
    prof = init_profile(d, cfg)
    if not prof.poor:
        return None
    init = fitting_init(d)
    ev = prof.evidence()
    ev["weight_scales"] = weight_scales(d)
    ev["suggested_init"] = init
    ev["reasoning"] = "; ".join(prof.reasons) + f"; {init.replace('_init', '')} init fits the activations found"
    msg = f"The initialization does not fit the network: {prof.reasons[0]}. Use {init.replace('_', ' ')}."
    return Finding("poor_initialization", "warning", prof.step, prof.step, tuple(prof.layers), ev,
                   "initialization", msg)
