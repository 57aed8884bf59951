"""skip_nonfinite: drop an optimizer step whose gradients hold NaN or Inf, as `GradScaler` does.

A skipped step changes neither the parameters nor the optimizer state: the guard sets
every `p.grad` to None, and PyTorch's optimizers (SGD, Adam, AdamW, RMSprop, ...) leave a
parameter without a gradient untouched, step counters and moments included. The LR
scheduler still steps, as with `GradScaler`.

Why keep it beside the sync-free `skip_step` (graddoctor.treat._spike_skip): this one costs one
host sync and no memory, works with every optimizer (host-side state included), names the bad
tensors in a "skipped_step" event and raises after `max_consecutive` bad steps in a row, which
needs the host to know. `skip_step` costs no sync but a copy of the parameters and their
optimizer state each step.

References:
  torch/amp/grad_scaler.py (`found_inf` and the skipped `optimizer.step`);
  optax `apply_if_finite` (counts bad steps, gives up after too many in a row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .._errors import GradDoctorError
from ..core._stats import TensorStats
from ._base import GradientTransform, Grads, TransformState, check_int, unchanged_stats


class NonFiniteGradientError(GradDoctorError):
    """Too many optimizer steps in a row had NaN/Inf gradients."""


@dataclass
class SkipState(TransformState):
    """State of `skip_nonfinite`.

    Attributes:
      consecutive: bad steps in a row, up to now.
      total: bad steps skipped over the whole run.
      skipped: whether the last step was skipped.
      bad: names of the tensors with non-finite gradients at the last bad step.
      names: names of all tensors (for messages), fixed at init.
    """

    consecutive: int
    total: int
    skipped: bool
    bad: tuple[str, ...]
    names: tuple[str, ...]


def skip_nonfinite(max_consecutive: int = 25) -> GradientTransform[SkipState]:
    """Skip steps whose gradients hold NaN/Inf; raise after more than `max_consecutive` in a row.

    Host syncs per step: 1. The non-finite counts that `watch` computed are copied to the
    host once (like `GradScaler`'s single `found_inf.item()`), because whether to skip
    the optimizer step is a host decision. Put it first in a `chain`, so adaptive clips
    never see a bad step.

    Args:
      max_consecutive: bad steps in a row that are skipped; the next one raises
        `NonFiniteGradientError` naming the first bad tensors.
    Returns:
      A `GradientTransform`; `update` returns None for the gradients on a bad step.
    """
    check_int("max_consecutive", max_consecutive, 0)

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> SkipState:
        names = tuple(names) if names else tuple(f"param[{i}]" for i in range(len(list(params))))
        return SkipState(0, 0, False, (), names)

    def update(grads: Grads, state: SkipState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], SkipState]:
        counts = stats.nonfinite.cpu()  # note: this is a CPU-GPU sync point (the one sync of this transform)
        bad_idx = torch.nonzero(counts > 0).flatten().tolist()
        if not bad_idx:
            return grads, SkipState(0, state.total, False, (), state.names)
        bad = tuple(state.names[i] if i < len(state.names) else f"param[{i}]" for i in bad_idx)
        consecutive = state.consecutive + 1
        if consecutive > max_consecutive:
            raise NonFiniteGradientError(
                f"{consecutive} optimizer steps in a row had non-finite gradients "
                f"(max_consecutive={max_consecutive}); first bad tensors: {', '.join(bad[:5])}"
                f"{' ...' if len(bad) > 5 else ''} ({len(bad)} of {len(counts)}). "
                "Likely causes: a learning rate too high, an input outlier or NaN in the data, an overflow in the "
                "loss. Remedies: lower_learning_rate, sanitize_inputs, clip_norm/zclip, rollback.")
        return None, SkipState(consecutive, state.total + 1, True, bad, state.names)

    def report(s: SkipState) -> dict[str, int]:
        return {"skipped": int(s.skipped)}

    return GradientTransform("skip_nonfinite", init, update, report, host_syncs=1, stats_after=unchanged_stats)
