"""One trial of the doctor: build the run afresh, apply the remedies, train under watch, diagnose.

Every trial (the baseline too) trains the same number of steps on the same batches: `batches()` is called
for a fresh iterator, and again whenever one runs out. The torch seed is set before `build()`, so a remedy
that leaves the weights alone starts from the baseline's weights.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from .._errors import ConfigError
from ..core._compose import watch
from ..diagnosis import diagnose
from ._treatment import Setup, Treatment, apply_treatments, clean

Build = Callable[[], tuple]
Batches = Callable[[], Iterable]
LossOf = Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> the step's scalar loss
TAIL = 0.1  # the final loss is the median of the last 10% of the steps


@dataclass
class Trial:
    """What one trial measured.

    Attributes:
      remedy: the remedy id, "+"-joined ids for a combination, "baseline" for the run as given.
      final_loss: the median of the last 10% of the training losses (robust to one noisy batch); the last
        loss when the run went non-finite (NaN/Inf are kept).
      holdout_loss: the mean loss on the held-out batches after training (NaN without them).
      findings: diagnose's finding codes at warning or above; critical: those at critical.
      run_dir: its run store; wall_s: its wall time in seconds; losses: the training loss of every step.
      error: why the remedy could not be applied (then nothing was trained); changes: what it changed.
    """

    remedy: str
    final_loss: float = math.nan
    holdout_loss: float = math.nan
    findings: tuple[str, ...] = ()
    critical: tuple[str, ...] = ()
    run_dir: str = ""
    wall_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    error: str = ""
    changes: list[str] = field(default_factory=list)
    cost: int = 0

    @property
    def nonfinite(self) -> bool:
        """The run went NaN/Inf (or could not run at all)."""
        return bool(self.error) or not self.losses or not all(math.isfinite(v) for v in self.losses)

    @property
    def score(self) -> float:
        """What ranks trials: the held-out loss when there is one, else the final training loss."""
        return self.final_loss if math.isnan(self.holdout_loss) else self.holdout_loss

    def to_dict(self) -> dict[str, Any]:
        return {"remedy": self.remedy, "final_loss": self.final_loss, "holdout_loss": self.holdout_loss,
                "score": self.score, "nonfinite": self.nonfinite, "findings": list(self.findings),
                "critical": list(self.critical), "run_dir": self.run_dir, "wall_s": self.wall_s,
                "losses": list(self.losses), "error": self.error, "changes": list(self.changes), "cost": self.cost}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trial":
        return cls(d["remedy"], float(d["final_loss"]), float(d["holdout_loss"]), tuple(d["findings"]),
                   tuple(d["critical"]), d["run_dir"], float(d["wall_s"]), [float(v) for v in d["losses"]],
                   d.get("error", ""), list(d.get("changes", [])), int(d.get("cost", 0)))


class SupervisedLoss:
    """`loss_fn(model(x), y)` for a batch `(x, y)`: the doctor's own contract (Lightning's is `training_step`)."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(model(x), y)


def final_loss(losses: list[float]) -> float:
    """The median of the last 10% of the losses (at least one); the last loss if any is NaN/Inf."""
    if not losses:
        return math.nan
    if not all(math.isfinite(v) for v in losses):
        return losses[-1]
    k = max(1, int(round(len(losses) * TAIL)))
    return float(np.median(losses[-k:]))


def _forever(batches: Batches) -> Iterator:
    """The batches, epoch after epoch (a fresh iterator from `batches()` each time one runs out)."""
    while True:
        empty = True
        for batch in batches():
            empty = False
            yield batch
        if empty:
            raise ConfigError("batches() returned an empty iterator: it must yield (x, y) pairs")


def run_trial(remedy: str, treatments: tuple[Treatment, ...], build: Build, batches: Batches,
              loss_of: LossOf, steps: int, run_dir: Path, seed: int = 0,
              holdout: Optional[Batches] = None) -> Trial:
    """Build, treat, train `steps` steps under watch into `run_dir`, diagnose. Never raises for a remedy that
    does not fit the model: the Trial carries the error instead."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model, optimizer = _built(build())
    data = _forever(batches)
    first = next(data)
    trial = Trial(remedy, run_dir=str(run_dir), cost=max((t.cost for t in treatments), default=0) + len(treatments))
    try:
        setup = apply_treatments(treatments, model, optimizer, _inputs(first), steps)
    except Exception as e:  # noqa: BLE001 - a remedy that does not fit this model is a result, not a crash
        trial.error, trial.wall_s = f"{type(e).__name__}: {e}", time.perf_counter() - t0
        return trial
    trial.changes = setup.changes
    trial.losses = _train(setup, first, data, loss_of, steps, run_dir)
    trial.final_loss = final_loss(trial.losses)
    if holdout is not None and not trial.nonfinite:
        trial.holdout_loss = evaluate(setup.model, holdout, loss_of)
    found = diagnose(run_dir)
    trial.findings = tuple(dict.fromkeys(f.code for f in found if f.severity != "info"))
    trial.critical = tuple(dict.fromkeys(f.code for f in found if f.severity == "critical"))
    trial.wall_s = time.perf_counter() - t0
    return trial


def _built(made: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    if (not isinstance(made, (tuple, list)) or len(made) != 2 or not isinstance(made[0], torch.nn.Module)
            or not isinstance(made[1], torch.optim.Optimizer)):
        raise ConfigError(f"build() returned {type(made).__name__}: it must return (model, optimizer), an nn.Module "
                          "and a torch.optim.Optimizer over its parameters")
    return made[0], made[1]


def _inputs(batch: Any) -> Any:
    """The model's input of a batch: its first element (a batch is (x, y), or what training_step takes)."""
    return batch[0] if isinstance(batch, (tuple, list)) and batch else batch


def _cleaned(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)) and batch:
        return (clean(batch[0]), *batch[1:])
    return clean(batch)


def _train(s: Setup, first: Any, data: Iterator, loss_of: LossOf, steps: int, run_dir: Path) -> list[float]:
    losses: list[float] = []
    batch = first
    with watch(s.model, s.optimizer, run_dir, guard=s.guard, overwrite=True, live_diagnosis=False) as w:
        for step in range(steps):
            if step:
                batch = next(data)
            loss = loss_of(s.model, _cleaned(batch) if s.clean_inputs else batch)
            total = loss + s.penalty(s.model) if s.penalty is not None else loss
            s.optimizer.zero_grad(set_to_none=True)
            total.backward()
            w.step(loss)
            s.optimizer.step()
            if s.scheduler is not None:
                s.scheduler.step()
            losses.append(float(loss.detach()))  # note: a host sync; on the CPU it costs nothing
            if not math.isfinite(losses[-1]):
                break  # a diverged run stays diverged: the rest of its steps would teach nothing
    return losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, holdout: Batches, loss_of: LossOf) -> float:
    """The mean loss over the held-out batches, in eval mode (restored afterwards)."""
    was = model.training
    model.eval()
    try:
        values = [float(loss_of(model, batch)) for batch in holdout()]
    finally:
        model.train(was)
    return float(np.mean(values)) if values else math.nan
