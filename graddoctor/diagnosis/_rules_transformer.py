"""Transformer stability rules: attention_logit_growth, output_logit_divergence, and the update spike
that came before a loss spike (evidence for `loss_spike`).

Pure functions over `RunData` (the `attn` and `logits` series watch samples every `activation_every`
steps, see graddoctor.core._signals, and the sampled update/weight ratios).

References:
  Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities", 2023.
  Dehghani et al., "Scaling Vision Transformers to 22 Billion Parameters", 2023 (QK-norm).
  Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022 (z-loss, 1e-4).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np

from ._config import DiagnoseConfig
from ._data import RunData
from ._evidence import _r
from ._findings import Finding

# The fewest earlier samples an update spike is judged against.
MIN_UPDATE_HISTORY = 3


def attention_logit_growth(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """An attention module's max logit |q.k|/sqrt(d_head) grew `attn_logit_growth` times over its first
    finite sample (at a high lr the logits grow several-fold within the first sampling interval) and
    reached `attn_logit_level`, where the softmax saturates (attention entropy collapse)."""
    if len(d.attn_steps) == 0 or not d.attn_modules:
        return None
    logit = d.attn[:, :, 0].astype(np.float64)  # [N, K]; +inf kept, NaN where not reachable or not called
    grown: list[tuple[float, int, float]] = []  # (peak, module, start)
    for k in range(logit.shape[1]):
        seen = logit[:, k][~np.isnan(logit[:, k])]
        finite = seen[np.isfinite(seen)]
        if not len(finite):
            continue
        start, peak = float(finite[0]), float(np.max(seen))
        if peak >= cfg.attn_logit_level and peak >= cfg.attn_logit_growth * start:
            grown.append((peak, k, start))
    if not grown:
        return None
    grown.sort(key=lambda g: -g[0])
    peak, k, start = grown[0]
    reached = d.attn_steps[logit[:, k] >= cfg.attn_logit_level]
    at_peak = int(np.nanargmax(np.where(np.isnan(logit[:, k]), -np.inf, logit[:, k])))
    modules = {d.attn_modules[j]: {"start": _r(s), "max": _r(p)} for p, j, s in grown[:5]}
    ev: dict[str, Any] = {
        "max_logit": _r(peak), "start_logit": _r(start), "growth": _r(peak / start) if start > 0 else math.inf,
        "level": cfg.attn_logit_level, "first_step_at_level": int(reached[0]), "modules": modules,
        "q_norm_at_max": _r(d.attn[at_peak, k, 1]), "k_norm_at_max": _r(d.attn[at_peak, k, 2]),
        "reasoning": ("attention logits grow without bound when q and k are not normalized, fastest at a high "
                      "learning rate (Wortsman et al. 2023; Dehghani et al. 2023): the softmax saturates to one-hot "
                      "and its gradient vanishes")}
    msg = (f"The max attention logit of {d.attn_modules[k]} grew from {start:.3g} to {peak:.3g} "
           f"(>= {cfg.attn_logit_level:g}: the softmax saturates); {len(grown)} attention module(s) grew.")
    return Finding("attention_logit_growth", "warning", int(reached[0]), int(d.attn_steps[-1]),
                   tuple(d.attn_modules[j] for _, j, _ in grown), ev, "learning_rate", msg)


def output_logit_divergence(d: RunData, cfg: DiagnoseConfig) -> Optional[Finding]:
    """The mean log Z of the output logits drifted to +-`logz_level` after starting within half of it."""
    if len(d.logz_steps) == 0:
        return None
    mean = d.logz[:, 0].astype(np.float64)
    finite = np.flatnonzero(np.isfinite(mean))
    if not len(finite) or abs(mean[finite[0]]) >= cfg.logz_level / 2:
        return None
    with np.errstate(invalid="ignore"):
        far = np.abs(mean) >= cfg.logz_level  # an infinite log Z counts; NaN does not
    if not far.any():
        return None
    worst = int(np.nanargmax(np.where(np.isnan(mean), -np.inf, np.abs(mean))))
    ev = {"start_logz_mean": _r(mean[finite[0]]), "worst_logz_mean": _r(mean[worst]), "worst_step":
          int(d.logz_steps[worst]), "logz_max_at_worst": _r(d.logz[worst, 1]), "level": cfg.logz_level,
          "reasoning": ("the softmax normalizer log Z is free to drift (softmax ignores a shift of the logits); far "
                        "from 0 the logits lose precision and the loss can diverge (PaLM 2022; Wortsman et al. "
                        "2023): a z-loss of 1e-4 * log(Z)^2 holds it near 0")}
    msg = (f"The output logits' mean log Z drifted from {mean[finite[0]]:.3g} to {mean[worst]:.3g} at step "
           f"{int(d.logz_steps[worst])} (beyond +-{cfg.logz_level:g}).")
    steps = d.logz_steps[far]
    return Finding("output_logit_divergence", "warning", int(steps[0]), int(steps[-1]), (), ev, "learning_rate", msg)


def update_spike_before(d: RunData, cfg: DiagnoseConfig, step: int) -> Optional[dict[str, Any]]:
    """The layer whose update/weight ratio spiked (`update_spike_factor` times its median over the earlier
    samples) at a sample within `baseline_window` steps before `step`, or None.

    Returns {"layer", "steps" (its spiking samples), "factor" (the largest, against that median),
    "layers" (every layer that spiked, largest first)}; a non-finite update counts as a spike.
    """
    r = d.log_update_ratio  # [U, E] log10; +inf where the update was non-finite
    if r.size == 0:
        return None
    cand = np.flatnonzero((d.update_steps < step) & (d.update_steps >= step - cfg.baseline_window))
    cand = cand[cand >= MIN_UPDATE_HISTORY]
    threshold = math.log10(cfg.update_spike_factor)
    jumps: dict[int, list[tuple[int, float]]] = {}  # eligible column -> (sample step, log10 jump)
    for u in cand:
        history = np.where(np.isfinite(r[:u]), r[:u], np.nan)
        if np.isnan(history).all():
            continue
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a column without finite history: NaN, no spike
            jump = r[u] - np.nanmedian(history, axis=0)
            spiked = np.flatnonzero(jump >= threshold)
        for e in spiked:
            jumps.setdefault(int(e), []).append((int(d.update_steps[u]), float(jump[e])))
    if not jumps:
        return None
    ranked = sorted(jumps, key=lambda e: -max(j for _, j in jumps[e]))
    top = jumps[ranked[0]]
    names = d.names(d.eligible[ranked])
    return {"layer": names[0], "steps": [s for s, _ in top], "factor": _r(10 ** max(j for _, j in top)),
            "layers": names[:5]}

