"""How the doctor ranks trials: the stated score.

1. A trial that went non-finite, or whose remedy could not be applied, ranks last.
2. Primary: the score, the held-out loss when held-out batches are given, else the final training loss
   (the median of the last 10% of the steps).
3. Scores within `TIE` (5%) of the best remaining one are a tie; a tie is broken by whether the baseline's
   critical findings cleared (fewer left first), then by cost (a training setting before a new init
   before a new model; one remedy before two), then by the score itself.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from ._trial import Trial

TIE = 0.05


def critical_left(trial: Trial, baseline: Trial) -> int:
    """How many of the baseline's critical findings the trial still has."""
    return len(set(trial.critical) & set(baseline.critical))


def cleared(trial: Trial, baseline: Trial) -> bool:
    """The trial ran, stayed finite, and none of the baseline's critical findings is left."""
    return not trial.nonfinite and critical_left(trial, baseline) == 0


def rank(trials: Sequence[Trial], baseline: Trial) -> list[Trial]:
    """The trials best first (see the module docstring)."""
    finite = sorted((t for t in trials if not t.nonfinite and math.isfinite(t.score)), key=lambda t: t.score)
    out: list[Trial] = []
    while finite:
        lead = finite[0].score
        tied = [t for t in finite if t.score <= lead + TIE * abs(lead)]
        out += sorted(tied, key=lambda t: (critical_left(t, baseline), t.cost, t.score))
        finite = [t for t in finite if t not in tied]
    rest = [t for t in trials if t not in out]
    return out + sorted(rest, key=lambda t: (bool(t.error), len(t.losses) == 0, -len(t.losses)))
