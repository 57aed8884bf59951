"""Rollback: on a loss spike or a non-finite loss, restore the last good snapshot and skip batches.

    rb = gd.treat.rollback(model, opt, scheduler, every=50)
    for x, y in loader:
        if rb.skipping():            # True for the `skip` batches after a rollback: drop them
            continue
        loss = loss_fn(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step(); scheduler.step()
        rb.step(loss)                # after the optimizer (and scheduler) step

How the data loader keeps working: it is never rewound or rebuilt. After a rollback the
model, optimizer, scheduler and RNG state go back to the snapshot, and the loop keeps drawing
batches from where it is; `skipping()` makes it drop the next `skip` of them. So the batches
between the snapshot and the spike are not trained on (their updates were undone) and
neither are the `skip` that follow: the data that led to the spike is stepped over, as in
PaLM (restart ~100 steps before a spike, skip 200-500 batches).

Defaults scaled to run length: give `total_steps=N` and a snapshot is taken every
`every = max(1, N // 200)` steps (50 without it), so one rollback loses under 0.5% of the run;
`keep` snapshots (3); `skip` = `every` batches dropped after a rollback (the rewind is `every/2`
on average, so skip/rewind ~ 2, PaLM's low end); at most `max_rollbacks` (5) rollbacks before
`RollbackLimitError`.

Which snapshot: the newest one taken before the spike. If the spike comes back before a
newer snapshot is taken, that snapshot is dropped and the one before it is used.

Host syncs: one per `step()` (`float(loss)`: deciding to roll back is a host decision).
Snapshots live in memory (cloned tensors), or on disk with `directory=`.

References:
  Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022, section 5.1.
  https://arxiv.org/abs/2204.02311
"""
from __future__ import annotations

import copy
import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._errors import ConfigError, GradDoctorError
from ._base import check_int


class RollbackLimitError(GradDoctorError):
    """Training rolled back more often than allowed; the cause is not transient."""


def is_spike(loss: float, recent: Sequence[float], factor: float, max_factor: float,
             min_history: int) -> tuple[bool, str]:
    """Decide whether `loss` is a spike against the recent healthy losses. Pure function.

    A spike is a non-finite loss, or (with at least `min_history` recent losses) one above both
    `factor * median` and `max_factor * max` of the recent losses. The second test matters late in
    training, where mini-batch losses near zero are heavy-tailed: a batch at 4x the median is
    ordinary there, but one well above everything in the window is not.

    Returns:
      (decision, human-readable reason).
    """
    if not math.isfinite(loss):
        return True, f"loss is {loss}"
    if len(recent) < min_history:
        return False, f"only {len(recent)} losses seen (need {min_history})"
    med, top = median(recent), max(recent)
    if loss > factor * med and loss > max_factor * top:
        return True, (f"loss {loss:.4g} > {factor:g} x median {med:.4g} and > {max_factor:g} x max {top:.4g} "
                      f"of the last {len(recent)}")
    return False, "loss within the recent range"


@dataclass
class Snapshot:
    """Model, optimizer, scheduler, extra and RNG state at the end of one step (in memory or a file)."""

    step: int
    state: Optional[dict]
    path: Optional[Path] = None

    def load(self) -> dict:
        if self.state is not None:
            return self.state
        assert self.path is not None, "a Snapshot holds its state in memory or in a file"  # internal invariant
        return torch.load(self.path, weights_only=False)


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def rng_state() -> dict:
    """The RNG states of torch (CPU and CUDA), numpy and Python's random."""
    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Rollback:
    """Keeps bounded snapshots and restores the last good one after a loss spike (see module docstring).

    Attributes:
      steps: `step()` calls so far; rollbacks: list of (step, restored snapshot step, reason).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 every: Optional[int] = None, total_steps: Optional[int] = None, keep: int = 3,
                 skip: Optional[int] = None, max_rollbacks: int = 5,
                 factor: float = 3.0, max_factor: float = 2.0, window: int = 50, min_history: int = 10,
                 directory: Optional[str | Path] = None, extra: Sequence[Any] = (), watch: Any = None):
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ConfigError(f"total_steps={total_steps!r} is not allowed: use None or an integer >= 1")
        if every is None:
            every = max(1, total_steps // 200) if total_steps else 50
        for name, v, lo in (("every", every, 1), ("keep", keep, 1), ("max_rollbacks", max_rollbacks, 0),
                            ("window", window, 1), ("min_history", min_history, 1)):
            check_int(name, v, lo)
        if skip is not None and (not isinstance(skip, int) or skip < 0):
            raise ConfigError(f"skip={skip!r} is not allowed: use None (= every) or an integer >= 0")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.keep, self.skip = every, keep, every if skip is None else skip
        self.max_rollbacks, self.factor, self.max_factor = max_rollbacks, factor, max_factor
        self.min_history = min_history
        self.directory = Path(directory) if directory is not None else None
        self.extra, self.watch = list(extra), watch
        self.steps = 0
        self.rollbacks: list[tuple[int, int, str]] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._snapshots: deque[Snapshot] = deque()
        self._to_skip = 0
        self._last_restored: Optional[int] = None
        self.snapshot()  # the state before training: an early spike can roll back to it

    def _state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "extra": [e.state_dict() for e in self.extra], "rng": rng_state(), "recent": list(self._recent)}

    def snapshot(self) -> None:
        """Store the current state as a snapshot (dropping the oldest beyond `keep`)."""
        state = _clone(self._state())
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"rollback-{self.steps:09d}.pt"
            torch.save(state, path)
            self._snapshots.append(Snapshot(self.steps, None, path))
        else:
            self._snapshots.append(Snapshot(self.steps, state))
        while len(self._snapshots) > self.keep:
            old = self._snapshots.popleft()
            if old.path is not None:
                old.path.unlink(missing_ok=True)

    def restore(self, snap: Snapshot) -> None:
        """Load a snapshot into the model, optimizer, scheduler, extras and RNGs (bit for bit)."""
        state = snap.load()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(_clone(state["optimizer"]))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        for e, s in zip(self.extra, state["extra"]):
            e.load_state_dict(_clone(s))
        set_rng_state(state["rng"])
        self._recent = deque(state["recent"], maxlen=self._recent.maxlen)

    def skipping(self) -> bool:
        """True if the current batch must be dropped (one of the `skip` batches after a rollback)."""
        if self._to_skip > 0:
            self._to_skip -= 1
            return True
        return False

    def step(self, loss: Tensor | float) -> bool:
        """Check the step's loss; roll back on a spike, else snapshot every `every` steps.

        note: this is a CPU-GPU sync point (`float(loss)`), one per call.

        Returns:
          True if the step was kept, False if training was rolled back.
        """
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        self.steps += 1
        spike, reason = is_spike(value, self._recent, self.factor, self.max_factor, self.min_history)
        if spike:
            self._roll_back(reason)
            return False
        self._recent.append(value)
        if self.steps % self.every == 0:
            self.snapshot()
            self._last_restored = None
        return True

    def _roll_back(self, reason: str) -> None:
        if len(self.rollbacks) >= self.max_rollbacks:
            raise RollbackLimitError(
                f"rolled back {len(self.rollbacks)} times (max_rollbacks={self.max_rollbacks}) and the loss spiked "
                f"again at step {self.steps}: {reason}. Earlier rollbacks at steps {[r[0] for r in self.rollbacks]}. "
                "The cause is not transient: lower the learning rate, clip gradients (clip_norm, zclip), "
                "check the data.")
        if self._last_restored is not None and len(self._snapshots) > 1:
            self._snapshots.pop()  # the spike came back from that snapshot: go one further back
        snap = self._snapshots[-1]
        self.restore(snap)
        self._last_restored = snap.step
        self._to_skip = self.skip
        self.rollbacks.append((self.steps, snap.step, reason))
        if self.watch is not None:
            self.watch.record_event("rollback", {"restored_step": snap.step, "reason": reason, "skip": self.skip})


def rollback(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, **options: Any) -> Rollback:
    """Create a `Rollback` (see its module docstring for the loop and the defaults).

    Args:
      model, optimizer, scheduler: what is snapshotted and restored (scheduler optional).
      **options: every (or total_steps, giving every = total_steps // 200), keep, skip, max_rollbacks, factor,
        max_factor, window, min_history, directory, extra (more objects with state_dict/load_state_dict,
        e.g. a `Guard`), watch (records a "rollback" event).
    Returns:
      A `Rollback`.
    """
    return Rollback(model, optimizer, scheduler, **options)
