"""Adaptive clipping: the threshold follows the run instead of being fixed by hand.

- `auto_clip`: clip to a percentile of the history of global norms (AutoClip).
- `agc`: clip each unit's gradient relative to its weight norm (NFNets' adaptive gradient clipping).
- `zclip`: clip norms that are z-score outliers against an EMA of mean and variance (ZClip).

None of them syncs with the host: every threshold and coefficient is a device
tensor, histories are device buffers, and the step counters that decide warmup or
buffer growth are host integers counted by `update` itself. A non-finite global
norm (a NaN step) is never fed into a history or an EMA: put `skip_nonfinite`
first in the chain to also drop that step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._errors import ConfigError
from ..core._stats import TensorStats
from ._base import (
    GradientTransform,
    Grads,
    TransformState,
    check_int,
    check_positive,
    clip_coefficient,
    scale_,
    scaled_stats,
)
from ._transforms import stats_device


def _finite_or_nan(x: Tensor) -> Tensor:
    return torch.where(x.isfinite(), x, torch.full_like(x, math.nan))


@dataclass
class AutoClipState(TransformState):
    """State of `auto_clip`.

    Attributes:
      history: float32 [capacity] global norms seen so far (NaN = empty slot or non-finite norm).
      count: steps seen (host int: decides where the next norm goes without a sync).
      coef: float32 0-d, the last clip coefficient.
    """

    history: Tensor
    count: int
    coef: Tensor


def auto_clip(percentile: float = 10.0, history_size: Optional[int] = None) -> GradientTransform[AutoClipState]:
    """AutoClip: clip the global norm to the `percentile`-th percentile of all global norms so far.

    Each step appends the current global norm to the history first, then takes the
    percentile (linear interpolation, as `numpy.percentile`) and clips as `clip_grad_norm_`.

    Host syncs per step: 0. Cost: a sort of the history each step (`torch.nanquantile`);
    pass `history_size` to keep only the last N norms (a ring buffer) on long runs.

    Args:
      percentile: in (0, 100]; the paper recommends 10.
      history_size: None keeps every norm (the paper); an int keeps the last N.
    Returns:
      A `GradientTransform`.
    References:
      Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks", MLSP 2020. https://arxiv.org/abs/2007.14469
    """
    if not isinstance(percentile, (int, float)) or not 0 < percentile <= 100:
        raise ConfigError(f"percentile={percentile!r} is not allowed: use a number in (0, 100]")
    if history_size is not None and (not isinstance(history_size, int) or history_size < 1):
        raise ConfigError(f"history_size={history_size!r} is not allowed: use None (keep all) or an integer >= 1")
    q = float(percentile) / 100.0

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> AutoClipState:
        dev = stats_device(params)
        cap = history_size or 256
        return AutoClipState(torch.full((cap,), math.nan, device=dev), 0, torch.full((), math.nan, device=dev))

    def update(grads: Grads, state: AutoClipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], AutoClipState]:
        history = state.history
        if history_size is None and state.count == history.numel():  # grow: double the buffer
            history = torch.cat([history, torch.full_like(history, math.nan)])
        else:
            history = history.clone()
        history[state.count % history.numel()] = _finite_or_nan(stats.total_norm)
        threshold = torch.nanquantile(history, q)
        coef = clip_coefficient(threshold, stats.total_norm)
        coef = torch.where(threshold.isnan(), torch.ones_like(coef), coef)  # no finite norm seen yet
        scale_(grads, coef)
        return grads, AutoClipState(history, state.count + 1, coef)

    return GradientTransform("auto_clip", init, update, lambda s: {"coef": s.coef},
                             stats_after=lambda stats, s: scaled_stats(stats, s.coef))


@dataclass
class AGCState(TransformState):
    """State of `agc`.

    Attributes:
      clipped: float32 0-d, fraction of units whose gradient was rescaled at the last step.
      skip: indices of the tensors left alone (the final layer, `exclude`), fixed at init.
    """

    clipped: Tensor
    skip: tuple[int, ...]


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm of each output unit: over all dims but the first (rows of a Linear weight,
    filters of a conv); a vector or scalar (a bias, a gain) counts as one unit."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def _final_layer(names: Optional[Sequence[str]], params: Sequence[Tensor]) -> set[int]:
    """Indices of the final layer's tensors: those of the module that owns the last parameter
    (from names), or without names the last matrix and everything after it."""
    if not params:
        return set()
    if names:
        module = names[-1].rpartition(".")[0]
        return {i for i, n in enumerate(names) if n.rpartition(".")[0] == module}
    last_matrix = max((i for i, p in enumerate(params) if p.ndim >= 2), default=len(params) - 1)
    return set(range(last_matrix, len(params)))


def agc(clipping: float = 0.01, eps: float = 1e-3, exclude_final: bool = True,
        exclude: Sequence[str] = ()) -> GradientTransform[AGCState]:
    """Adaptive gradient clipping, unit-wise: rescale G_i where ||G_i|| / max(||W_i||, eps) > clipping.

    For each unit i (row of a weight matrix, filter of a conv, whole bias vector),
    `max_norm_i = clipping * max(||W_i||, eps)`, and if `||G_i|| > max_norm_i` the unit's
    gradient becomes `G_i * max_norm_i / max(||G_i||, 1e-6)`.

    Unit-wise norms are not among the per-tensor statistics `watch` records, so this
    transform takes them itself (one norm per tensor of gradient and weight); it needs
    the parameters: the guard passes them.

    Host syncs per step: 0. Records `agc.clipped`, the fraction of units rescaled.

    Args:
      clipping: the ratio lambda (0.01 for batch 4096 in the paper, larger for small batches).
      eps: floor of the weight norm, so zero-initialised weights can move.
      exclude_final: skip the final classifier layer, as the paper recommends.
      exclude: more parameter names to skip.
    Returns:
      A `GradientTransform`.
    References:
      Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
      Normalization", ICML 2021. https://arxiv.org/abs/2102.06171
    """
    lam = check_positive("clipping", clipping)
    floor = check_positive("eps", eps)
    skip_names = set(exclude)

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> AGCState:
        params = list(params)
        skip = _final_layer(names, params) if exclude_final else set()
        if names:
            skip |= {i for i, n in enumerate(names) if n in skip_names}
        return AGCState(torch.zeros((), device=stats_device(params)), tuple(sorted(skip)))

    def update(grads: Grads, state: AGCState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], AGCState]:
        if params is None:
            raise ConfigError("agc needs the parameters: call update(grads, state, stats, params) (the guard does)")
        skip = set(state.skip)
        clipped, units = [], 0
        for i, (g, w) in enumerate(zip(grads, params)):
            if g is None or i in skip:
                continue
            max_norm = unitwise_norm(w.detach()).clamp_min(floor) * lam
            g_norm = unitwise_norm(g)
            trigger = g_norm > max_norm
            g.copy_(torch.where(trigger, g * (max_norm / g_norm.clamp_min(1e-6)), g))
            clipped.append(trigger.sum().to(stats.norm.device, torch.float32))
            units += trigger.numel()
        frac = torch.stack(clipped).sum() / units if units else torch.zeros((), device=stats.norm.device)
        return grads, AGCState(frac, state.skip)

    return GradientTransform("agc", init, update, lambda s: {"clipped": s.clipped})


@dataclass
class ZClipState(TransformState):
    """State of `zclip`.

    Attributes:
      warmup: float32 [warmup] global norms of the warmup steps (NaN until seen).
      mean: float32 0-d EMA of the (clipped) global norm; NaN during warmup.
      var: float32 0-d EMA of its variance; NaN during warmup.
      count: steps seen (host int: decides warmup without a sync).
      coef: float32 0-d, the last clip coefficient.
    """

    warmup: Tensor
    mean: Tensor
    var: Tensor
    count: int
    coef: Tensor


def zclip(alpha: float = 0.97, z_threshold: float = 2.5, warmup: int = 25,
          eps: float = 1e-6) -> GradientTransform[ZClipState]:
    """ZClip: clip the global norm when its z-score against EMA statistics exceeds `z_threshold`.

    Update rule (paper, "adaptive scaling"), for the global norm g_t after warmup:
      z_t = (g_t - mu) / (sigma + eps),  sigma = sqrt(var);
      if z_t > z_thr: g*_t = mu + z_thr * sigma / (z_t / z_thr) = mu + z_thr^2 * sigma / z_t, and the
        gradients are scaled by min(1, g*_t / (g_t + 1e-6)); else g*_t = g_t and nothing changes;
      mu <- alpha * mu + (1 - alpha) * g*_t;  var <- alpha * var + (1 - alpha) * (g*_t - mu)^2
      (the EMA is fed the clipped norm, and the variance uses the updated mean).
    During the first `warmup` steps nothing is clipped; then mu and var start as the mean and
    the (population) variance of the warmup norms. Non-finite norms are left out of the statistics.

    Host syncs per step: 0. Records `zclip.coef`.

    Args:
      alpha: EMA smoothing factor.
      z_threshold: z-score above which a norm is an outlier.
      warmup: steps used to initialise mu and var.
      eps: added to sigma in the z-score.
    Returns:
      A `GradientTransform`.
    References:
      Kumar, Owen, Chowdhury, Güra, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", 2025.
      https://arxiv.org/abs/2504.02507
    """
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"alpha={alpha!r} is not allowed: use a number in (0, 1)")
    zt = check_positive("z_threshold", z_threshold)
    check_int("warmup", warmup, 1)
    e = check_positive("eps", eps)

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> ZClipState:
        dev = stats_device(params)
        nan = torch.full((), math.nan, device=dev)
        return ZClipState(torch.full((warmup,), math.nan, device=dev), nan.clone(), nan.clone(), 0, nan.clone())

    def update(grads: Grads, state: ZClipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], ZClipState]:
        g = stats.total_norm.to(torch.float32)
        if state.count < warmup:
            buf = state.warmup.clone()
            buf[state.count] = _finite_or_nan(g)
            mean, var = state.mean, state.var
            if state.count + 1 == warmup:  # start the EMA from the warmup norms
                mean = torch.nanmean(buf)
                var = torch.nanmean((buf - mean).square())
            one = torch.ones((), device=g.device)
            return grads, ZClipState(buf, mean, var, state.count + 1, one)
        mean, var = state.mean, state.var
        std = var.sqrt()
        z = (g - mean) / (std + e)
        spike = z > zt
        clipped_norm = torch.where(spike, mean + zt * zt * std / z, g)
        coef = torch.where(spike, clip_coefficient(clipped_norm, g), torch.ones_like(g))
        scale_(grads, coef)
        finite = g.isfinite()
        new_mean = alpha * mean + (1 - alpha) * clipped_norm
        new_var = alpha * var + (1 - alpha) * (clipped_norm - new_mean).square()
        mean = torch.where(finite, new_mean, mean)
        var = torch.where(finite, new_var, var)
        return grads, ZClipState(state.warmup, mean, var, state.count + 1, coef)

    return GradientTransform("zclip", init, update, lambda s: {"coef": s.coef},
                             stats_after=lambda stats, s: scaled_stats(stats, s.coef))
