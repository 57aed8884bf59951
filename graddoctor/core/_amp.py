"""Mixed precision: what `watch(..., scaler=scaler)` does with a `torch.amp.GradScaler`.

Under a GradScaler the gradients after backward are the true ones times the loss scale (65536
by default), and on some steps they overflow float16 to Inf/NaN: the scaler then skips the
optimizer step and halves its scale. Both are expected and harmless, but statistics taken on
scaled gradients are off by the scale, and an overflow step looks like a critical non-finite
gradient. So watch, given the scaler:
  - measures the true gradients: if the loop has not unscaled them yet, it measures the scaled
    ones and divides the norms and max-abs by the scale (a power of two: exact), leaving the
    gradients as they are, so a later `scaler.unscale_` (the loop's, Accelerate's
    `clip_grad_norm_`, Lightning's, the HF Trainer's) still works; with a guard, which changes
    gradients in place, it unscales them first (`scaler.unscale_(optimizer)`, as `scaler.step`
    would);
  - records per step the loss scale the step was taken with and whether the scaler found an
    overflow (series `amp`, AMP_FIELDS), both read at the next flush: no host sync.
diagnose then keeps overflow steps the scaler skipped apart from real non-finite gradients.

GradScaler keeps the per-step facts in private attributes (`_scale`, `_per_optimizer_states`);
reading them is what keeps this free of host syncs (`get_scale()` syncs). The tests in
tests/test_amp.py train through a real GradScaler, so a change in them fails there.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .._errors import ConfigError
from ..store._series import AMP_FIELDS  # the column order of its rows


def overflowed(amp: np.ndarray) -> np.ndarray:
    """Per row of a stored `amp` series: True where the GradScaler found an overflow and skipped the step."""
    return amp[:, AMP_FIELDS.index("overflow")] > 0


def check_scaler(scaler: Any, optimizer: Optional[torch.optim.Optimizer]) -> Optional[Any]:
    """The scaler watch should use (None when there is none, or it is disabled); refuses bad input."""
    if scaler is None:
        return None
    if type(scaler).__name__ == "Accelerator" and hasattr(scaler, "scaler"):  # Accelerate: its GradScaler, if any
        scaler = scaler.scaler
        if scaler is None:
            return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ConfigError(f"scaler={scaler!r} is not allowed: give the torch.amp.GradScaler that scales this "
                          "run's loss, the accelerate.Accelerator that holds it, or None")
    if optimizer is None:
        raise ConfigError("scaler= needs the optimizer too, as GradScaler unscales per optimizer: "
                          "gd.watch(model, optimizer, run_dir, scaler=scaler)")
    return scaler if scaler.is_enabled() else None


def scaler_meta(scaler: Any) -> dict[str, Any]:
    """The scaler's settings, for the run's metadata (no sync: its constructor arguments)."""
    return {"init_scale": scaler._init_scale, "growth_factor": scaler._growth_factor,
            "backoff_factor": scaler._backoff_factor, "growth_interval": scaler._growth_interval}


def _stage(scaler: Any, optimizer: torch.optim.Optimizer) -> Any:
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("watch.step() was called after scaler.step(optimizer) in this iteration: call "
                           "w.step(loss) between backward and scaler.step(optimizer)")
    if state["stage"] is OptState.READY and scaler._scale is None:
        raise RuntimeError("watch.step() found a GradScaler that has scaled no loss yet: call "
                           "scaler.scale(loss).backward() before w.step(loss)")
    return state


def scale_left_in(scaler: Any, optimizer: torch.optim.Optimizer) -> Optional[Tensor]:
    """The loss scale the optimizer's gradients still carry (a device tensor), or None when the loop
    has unscaled them already. No host sync."""
    from torch.amp.grad_scaler import OptState

    return scaler._scale if _stage(scaler, optimizer)["stage"] is OptState.READY else None


def divide_out(stats: Any, scale: Tensor) -> Any:
    """`stats` of gradients scaled by `scale`, as those of the true gradients: norms and max-abs are
    divided by it (a power of two, so exactly); the non-finite counts are the same. No host sync."""
    inv = scale.detach().reshape(()).reciprocal().to(stats.norm.device, torch.float32)
    return replace(stats, norm=stats.norm * inv, maxabs=stats.maxabs * inv, total_norm=stats.total_norm * inv)


def row_from_stats(scaler: Any, stats: Any, device: torch.device) -> Tensor:
    """This step's `amp` row when watch left the gradients scaled: the scale, and 1.0 where any gradient
    is NaN/Inf (the test `scaler.unscale_` makes before it skips the step). No host sync."""
    overflow = (stats.nonfinite > 0).any().reshape(1).to(device=device, dtype=torch.float32)
    return torch.cat([scaler._scale.detach().reshape(1).to(device=device, dtype=torch.float32), overflow])


def unscale_and_row(scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """Unscale the optimizer's gradients (unless the loop did) and return this step's `amp` row.

    The row is float32 [2] on `device`: the loss scale this step was taken with, and 1.0 if the
    scaler found an Inf/NaN in the gradients (it will skip `optimizer.step()`), else 0.0.
    No host sync.
    """
    from torch.amp.grad_scaler import OptState

    state = _stage(scaler, optimizer)
    if state["stage"] is OptState.READY:
        scaler.unscale_(optimizer)
    # scaler.update() changes the scale in place after this step: the row is a copy (torch.cat copies).
    scale = scaler._scale.detach().reshape(1)
    found = [f.reshape(1) for f in state["found_inf_per_device"].values()]
    if len(found) == 1 and scale.device == found[0].device == device:  # one op: each costs ~50 us in a step
        return torch.cat([scale, found[0]]).float()
    overflow = torch.cat([f.to(device) for f in found]).amax().reshape(1) if found else torch.zeros(1, device=device)
    return torch.cat([scale.to(device=device, dtype=torch.float32), overflow.float()])
