"""Fixed clipping: by value, by global L2 norm, by each tensor's L2 norm.

All three reuse the statistics `watch` computed (`TensorStats.maxabs`, `.norm`,
`.total_norm`) and need no host sync: coefficients are clamped on the device,
never compared with `if`.

Keras defaults, for reference (the seeds quote them): `clipnorm=1.0` is
`clip_norm_per_tensor(1.0)` (Keras clips each variable separately), `clipvalue=0.5`
is `clip_value(0.5)`; Keras' `global_clipnorm=1.0` is `clip_norm(1.0)`.

References:
  torch/nn/utils/clip_grad.py (`clip_grad_value_`, `clip_grad_norm_`, `clip_grads_with_norm_`).
  Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural networks", 2013.
  https://arxiv.org/abs/1211.5063
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..core._stats import TensorStats, group_by_device_dtype
from ._base import (
    GradientTransform,
    Grads,
    TransformState,
    check_positive,
    clip_by_total_norm_,
    clip_coefficient,
    scale_each_,
    scaled_stats,
    take,
)


def stats_device(params: Sequence[Tensor]) -> torch.device:
    """Device of the first parameter (where `watch` keeps its statistics); CPU for an empty list."""
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        return local.device
    return torch.device("cpu")


@dataclass
class ClipState(TransformState):
    """State of a fixed clip: only what the last step did (so it can be recorded).

    Attributes:
      coef: float32 0-d, the last clip coefficient (1 = untouched; NaN before the first step);
        for `clip_value`, the number of tensors that had an entry beyond the bound.
    """

    coef: Tensor


def _clip_init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> ClipState:
    return ClipState(torch.full((), math.nan, device=stats_device(params)))


def clip_value(clip: float = 0.5) -> GradientTransform[ClipState]:
    """Clamp every gradient entry to [-clip, clip], exactly as `torch.nn.utils.clip_grad_value_`.

    Host syncs per step: 0. Records `clip_value.clipped`: how many tensors had an entry beyond `clip`
    (from `stats.maxabs`, no extra pass).

    Args:
      clip: the bound (Keras' `clipvalue` default is 0.5).
    Returns:
      A `GradientTransform`.
    """
    c = check_positive("clip", clip)

    def update(grads: Grads, state: ClipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], ClipState]:
        for _key, idx in group_by_device_dtype(grads).items():
            group = take(grads, idx)
            torch._foreach_clamp_min_(group, -c)
            torch._foreach_clamp_max_(group, c)
        clipped = (stats.maxabs > c).sum().to(torch.float32)
        return grads, ClipState(clipped)

    return GradientTransform("clip_value", _clip_init, update, lambda s: {"clipped": s.coef})


def clip_norm(max_norm: float = 1.0) -> GradientTransform[ClipState]:
    """Scale all gradients by `min(1, max_norm / (total_norm + 1e-6))`, as `torch.nn.utils.clip_grad_norm_`.

    The total norm is `stats.total_norm`, which `tensor_stats` forms as `get_total_norm` does,
    so no second pass is made. With PyTorch's norm ops (accelerators, or GRADDOCTOR_NATIVE=0)
    the result equals `clip_grad_norm_` bit for bit on float32 gradients; the CPU's native
    kernel sums squares in float64 blocks, so there they agree to rounding (typically ~1e-7
    relative, at worst the block-sum bound of tests/_numerics.py, ~3e-6 on these sizes). On other
    dtypes PyTorch takes the norm in the gradient's dtype and graddoctor in float32, so they
    agree to that dtype's rounding. On a CPU a coefficient of exactly 1 skips the multiply.

    Host syncs per step: 0. Records `clip_norm.coef`.

    Args:
      max_norm: the largest allowed global L2 norm.
    Returns:
      A `GradientTransform`.
    """
    m = check_positive("max_norm", max_norm)

    def update(grads: Grads, state: ClipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], ClipState]:
        return grads, ClipState(clip_by_total_norm_(grads, m, stats.total_norm))

    return GradientTransform("clip_norm", _clip_init, update, lambda s: {"coef": s.coef},
                             stats_after=lambda stats, s: scaled_stats(stats, s.coef))


@dataclass
class PerTensorClipState(TransformState):
    """State of `clip_norm_per_tensor`.

    Attributes:
      coef: float32 [P], each tensor's last clip coefficient (NaN for missing gradients).
    """

    coef: Tensor


def clip_norm_per_tensor(max_norm: float = 1.0) -> GradientTransform[PerTensorClipState]:
    """Clip each gradient tensor to L2 norm `max_norm` on its own (Keras `clipnorm` semantics).

    Tensor i is scaled by `min(1, max_norm / (norm_i + 1e-6))`, the coefficient
    `clip_grad_norm_([g_i], max_norm)` would use, from `stats.norm` (no second pass).

    Host syncs per step: 0. Records `clip_norm_per_tensor.min_coef` and `.clipped` (tensors scaled).

    Args:
      max_norm: the largest allowed L2 norm of each tensor (Keras' default clipnorm is 1.0).
    Returns:
      A `GradientTransform`.
    """
    m = check_positive("max_norm", max_norm)

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> PerTensorClipState:
        return PerTensorClipState(torch.full((len(list(params)),), math.nan, device=stats_device(params)))

    def update(grads: Grads, state: PerTensorClipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], PerTensorClipState]:
        coefs = clip_coefficient(m, stats.norm)
        scale_each_(grads, coefs)
        return grads, PerTensorClipState(coefs)

    def report(s: PerTensorClipState) -> dict[str, Tensor]:
        return {"min_coef": torch.nan_to_num(s.coef, nan=1.0).amin() if s.coef.numel() else s.coef.new_ones(()),
                "clipped": (s.coef < 1).sum().to(torch.float32)}

    return GradientTransform("clip_norm_per_tensor", init, update, report,
                             stats_after=lambda stats, s: scaled_stats(stats, s.coef))

