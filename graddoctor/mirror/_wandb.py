"""Weights & Biases: one history row per step, with its own step metric `graddoctor/step`.

graddoctor writes a flush's steps after the trainer may have logged later ones; W&B drops a row whose
`step=` is below its current step. So rows carry `graddoctor/step` and the `graddoctor/*` charts use it
as their x axis (`define_metric`), as Lightning's and the HF Trainer's own W&B loggers do with theirs.
"""
from __future__ import annotations

from typing import Any

from ._base import Mirror
from ._rows import PREFIX

STEP = PREFIX + "step"


class WandbMirror(Mirror):
    """Mirror to a W&B run (the result of `wandb.init(...)`).

    NaN and Inf reach the run's history as they are ("NaN", "Infinity" in its records); W&B's charts
    leave those points out, so `graddoctor/nonfinite` (1.0 on such steps) is the series to chart them.
    Each row is one W&B history row, so it advances W&B's own `_step`: log your own metrics with your own
    step metric (or without `step=`), not with a `step=` that W&B would now find too low.

    Args:
      run: the W&B run; it stays yours (graddoctor never finishes it).
    """

    def __init__(self, run: Any):
        self.run = run
        run.define_metric(STEP, hidden=True)
        run.define_metric(PREFIX + "*", step_metric=STEP)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({STEP: step, **values})

    def text(self, step: int, tag: str, text: str) -> None:
        self.run.log({STEP: step, tag: text})
