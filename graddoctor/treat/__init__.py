"""treat: every cure for vanishing and exploding gradients, as working code.

- Gradient transforms (optax-style, composed with `chain`, fed the statistics `watch` already
  computed): `clip_value`, `clip_norm`, `clip_norm_per_tensor`, `auto_clip`, `agc`, `zclip`,
  `skip_nonfinite` (one host sync), `skip_step` (non-finite and spiking steps, no sync);
  run them with `watch(..., guard=...)` or a standalone `Guard`.
- `rollback`: restore the last good snapshot after a loss spike, skip the batches that followed.
- `l1_penalty`, `l2_penalty`: weight penalties (and the note on AdamW's decoupled decay).
- `layerwise_pretrain`, `fine_tune`: greedy stacked denoising autoencoders, then supervised training.
- Initialization is `graddoctor.treat.init`, architecture changes are `graddoctor.treat.surgery`.
- `CATALOGUE`: every remedy once (`Cure`: id, reason, snippet, the callable that applies it, former ids);
  `REMEDIES` is the same catalogue as id -> that callable (or the snippet). Both accept former ids.
- `lr_warmup(optimizer, warmup_steps)`: a linear-warmup `LambdaLR` (the standard transformer recipe).
- `z_loss(logits, coef=1e-4)`: PaLM's penalty on log Z of the output logits (output logit divergence).
- `ModelFacts`: a model as its run store describes it; each cure's `applies(facts)` says whether it fits.
- `interventions(run)` / `format_interventions(run)`: what the guard and rollback did in a recorded run.
"""
from ._adaptive import AGCState, AutoClipState, ZClipState, agc, auto_clip, unitwise_norm, zclip
from ._applicable import ModelFacts
from ._base import ChainState, EmptyState, GradientTransform, TransformState, TransformStateError, chain
from ._catalogue import CATALOGUE, REMEDIES, Catalogue, Cure, UnknownRemedyError
from ._guard import Guard
from ._interventions import format_interventions, interventions
from ._pretrain import PretrainError, fine_tune, layerwise_pretrain
from ._regularization import l1_penalty, l2_penalty
from ._rollback import Rollback, RollbackLimitError, is_spike, rollback
from ._schedule import lr_warmup, warmup_factor
from ._skip import NonFiniteGradientError, SkipState, skip_nonfinite
from ._spike_skip import SkipStepState, StepRestore, skip_step
from ._transforms import ClipState, PerTensorClipState, clip_norm, clip_norm_per_tensor, clip_value
from ._zloss import z_loss

__all__ = [
    "GradientTransform", "TransformState", "TransformStateError", "EmptyState", "ChainState", "chain",
    "clip_value", "clip_norm", "clip_norm_per_tensor", "ClipState", "PerTensorClipState",
    "auto_clip", "agc", "zclip", "unitwise_norm", "AutoClipState", "AGCState", "ZClipState",
    "skip_nonfinite", "SkipState", "NonFiniteGradientError", "skip_step", "SkipStepState", "StepRestore", "Guard",
    "rollback", "Rollback", "RollbackLimitError", "is_spike", "l1_penalty", "l2_penalty",
    "layerwise_pretrain", "fine_tune", "PretrainError", "CATALOGUE", "REMEDIES", "Catalogue", "Cure",
    "UnknownRemedyError", "interventions", "format_interventions", "lr_warmup", "warmup_factor", "ModelFacts",
    "z_loss",
]
