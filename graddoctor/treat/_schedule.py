"""Learning-rate warmup: the step size grows linearly from near zero to its base over the first steps.

Post-LN transformers have large gradients near the output at initialization; Adam's early steps at the full
learning rate then throw the model into a bad region, and warmup is what lets them train at all (Xiong et al.
2020, "On Layer Normalization in the Transformer Architecture", arXiv:2002.04745; Vaswani et al. 2017 used
4000 warmup steps). It is the standard transformer recipe.

    scheduler = gd.treat.lr_warmup(opt, warmup_steps=100)
    # in the loop, after opt.step():
    scheduler.step()
"""
from __future__ import annotations

import torch

from .._errors import ConfigError
from ._base import check_int


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The multiplier of the base lr at `step` (0-based): (step + 1) / warmup_steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps)


def lr_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` that scales every group's lr by `warmup_factor(step, warmup_steps)`.

    The first optimizer step runs at lr / warmup_steps, step `warmup_steps - 1` and later at the full lr.
    Call `scheduler.step()` once after each `optimizer.step()`.

    Args:
      optimizer: a PyTorch optimizer; each group's current lr becomes its base lr.
      warmup_steps: steps to reach the base lr, an integer >= 1.
    Returns:
      The scheduler (it has already set the lr of step 0).
    References:
      Xiong et al. 2020, On Layer Normalization in the Transformer Architecture (arXiv:2002.04745).
    """
    check_int("warmup_steps", warmup_steps, 1)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"optimizer={type(optimizer).__name__} is not allowed: give a torch.optim.Optimizer")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup_steps))
