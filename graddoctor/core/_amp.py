"""Mixed precision: what `watch(..., scaler=scaler)` does with a `torch.amp.GradScaler`.

Under a GradScaler the gradients after backward are the true ones times the loss scale (65536
by default), and on some steps they overflow float16 to Inf/NaN: the scaler then skips the
optimizer step and halves its scale. Both are expected and harmless, but statistics taken on
scaled gradients are off by the scale, and an overflow step looks like a critical non-finite
gradient. So watch, given the scaler:
  - unscales the gradients before measuring them (`scaler.unscale_(optimizer)`, which the scaler
    would do anyway in `scaler.step`; skipped if the training loop already called it), so the
    statistics and a guard see the true gradients;
  - records per step the loss scale the step was taken with and whether the scaler found an
    overflow (series `amp`, AMP_FIELDS), both read at the next flush: no host sync.
diagnose then keeps overflow steps the scaler skipped apart from real non-finite gradients.

GradScaler keeps the per-step facts in private attributes (`_scale`, `_per_optimizer_states`);
reading them is what keeps this free of host syncs (`get_scale()` syncs). The tests in
tests/test_amp.py train through a real GradScaler, so a change in them fails there.
"""
from __future__ import annotations

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
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ConfigError(f"scaler={scaler!r} is not allowed: give the torch.amp.GradScaler that scales this "
                          "run's loss, or None")
    if optimizer is None:
        raise ConfigError("scaler= needs the optimizer too, as GradScaler unscales per optimizer: "
                          "gd.watch(model, optimizer, run_dir, scaler=scaler)")
    return scaler if scaler.is_enabled() else None


def scaler_meta(scaler: Any) -> dict[str, Any]:
    """The scaler's settings, for the run's metadata (no sync: its constructor arguments)."""
    return {"init_scale": scaler._init_scale, "growth_factor": scaler._growth_factor,
            "backoff_factor": scaler._backoff_factor, "growth_interval": scaler._growth_interval}


def unscale_and_row(scaler: Any, optimizer: torch.optim.Optimizer, device: torch.device) -> Tensor:
    """Unscale the optimizer's gradients (unless the loop did) and return this step's `amp` row.

    The row is float32 [2] on `device`: the loss scale this step was taken with, and 1.0 if the
    scaler found an Inf/NaN in the gradients (it will skip `optimizer.step()`), else 0.0.
    No host sync.
    """
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(optimizer)]
    if state["stage"] is OptState.STEPPED:
        raise RuntimeError("watch.step() was called after scaler.step(optimizer) in this iteration: call "
                           "w.step(loss) between backward and scaler.step(optimizer)")
    if state["stage"] is OptState.READY:
        if scaler._scale is None:
            raise RuntimeError("watch.step() found a GradScaler that has scaled no loss yet: call "
                               "scaler.scale(loss).backward() before w.step(loss)")
        scaler.unscale_(optimizer)
    # scaler.update() changes the scale in place after this step: the row is a copy (torch.cat copies).
    scale = scaler._scale.detach().reshape(1)
    found = [f.reshape(1) for f in state["found_inf_per_device"].values()]
    if len(found) == 1 and scale.device == found[0].device == device:  # one op: each costs ~50 us in a step
        return torch.cat([scale, found[0]]).float()
    overflow = torch.cat([f.to(device) for f in found]).amax().reshape(1) if found else torch.zeros(1, device=device)
    return torch.cat([scale.to(device=device, dtype=torch.float32), overflow.float()])
