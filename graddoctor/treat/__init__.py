"""treat: every cure for vanishing and exploding gradients, as working code.

- Gradient transforms (optax-style, composed with `chain`, fed the statistics `watch` already
  computed): `clip_value`, `clip_norm`, `clip_norm_per_tensor`, `auto_clip`, `agc`, `zclip`,
  `skip_nonfinite`; run them with `watch(..., guard=...)` or a standalone `Guard`.
"""
from ._adaptive import AGCState, AutoClipState, ZClipState, agc, auto_clip, unitwise_norm, zclip
from ._base import ChainState, EmptyState, GradientTransform, TransformState, TransformStateError, chain
from ._guard import Guard
from ._skip import NonFiniteGradientError, SkipState, skip_nonfinite
from ._transforms import ClipState, PerTensorClipState, clip_norm, clip_norm_per_tensor, clip_value

__all__ = [
    "GradientTransform", "TransformState", "TransformStateError", "EmptyState", "ChainState", "chain",
    "clip_value", "clip_norm", "clip_norm_per_tensor", "ClipState", "PerTensorClipState",
    "auto_clip", "agc", "zclip", "unitwise_norm", "AutoClipState", "AGCState", "ZClipState",
    "skip_nonfinite", "SkipState", "NonFiniteGradientError", "Guard",
]
