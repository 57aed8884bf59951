"""Running trials: in this process, or in forked worker processes when there are spare cores.

Workers are forked (never spawned), so `build`, `batches` and `loss_fn` need not be picklable (a lambda or a
function of a script works): they are left in `_JOB` before the fork and each worker reads its copy. Only
the trial's index goes to a worker and only the `Trial` comes back. Each worker trains on one intra-op
thread, so that N workers use N cores.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ._treatment import Treatment
from ._trial import Trial, run_trial


@dataclass(frozen=True)
class Spec:
    """One trial to run: its name, the treatments, its run directory."""

    remedy: str
    treatments: tuple[Treatment, ...]
    run_dir: Path


_JOB: dict[str, Any] = {}  # the training run's callables, set before the workers fork


def default_workers() -> int:
    """One worker per spare core: all cores but one (the one this process and the machine keep)."""
    return max(1, (os.cpu_count() or 1) - 1)


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class Runner:
    """Runs specs with a shared job (build, batches, loss_fn, steps, seed, holdout), within a deadline."""

    def __init__(self, job: dict[str, Any], workers: int, deadline: float, estimate_s: float,
                 tick: Callable[[str], None]):
        self.job, self.workers, self.deadline, self.estimate_s, self.tick = job, workers, deadline, estimate_s, tick

    def affordable(self, n: int) -> int:
        """How many of `n` trials fit before the deadline, at the baseline's wall time each."""
        left = self.deadline - time.perf_counter()
        if left == float("inf"):
            return n
        waves = int(left // max(self.estimate_s, 1e-3))
        return max(0, min(n, waves * self.workers))

    def run(self, specs: list[Spec]) -> list[Trial]:
        if self.workers <= 1 or len(specs) <= 1 or not can_fork():
            return [self._one(s) for s in specs]
        _JOB.clear()
        _JOB.update(self.job, specs=specs)
        ctx = multiprocessing.get_context("fork")
        out: list[Optional[Trial]] = [None] * len(specs)
        with ProcessPoolExecutor(max_workers=min(self.workers, len(specs)), mp_context=ctx) as pool:
            futures = {pool.submit(_worker, i): i for i in range(len(specs))}
            for fut in futures:
                out[futures[fut]] = fut.result()
                self.tick(specs[futures[fut]].remedy)
        _JOB.clear()
        return [t for t in out if t is not None]

    def _one(self, s: Spec) -> Trial:
        j = self.job
        trial = run_trial(s.remedy, s.treatments, j["build"], j["batches"], j["loss_of"], j["steps"], s.run_dir,
                          j["seed"], j["holdout"])
        self.tick(s.remedy)
        return trial


def _worker(i: int) -> Trial:
    torch.set_num_threads(1)
    j, s = _JOB, _JOB["specs"][i]
    return run_trial(s.remedy, s.treatments, j["build"], j["batches"], j["loss_of"], j["steps"], s.run_dir,
                     j["seed"], j["holdout"])
