"""`gd.doctor`: run the baseline, diagnose it, try the remedies diagnose ranks and the obvious controls,
measure them side by side, and prescribe the one that works.

    rx = gd.doctor(build, batches, loss_fn, steps=200)   # build() -> (model, optimizer), fresh each call
    print(gd.format_prescription(rx))                     # batches() -> a fresh iterator of (x, y)
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .._errors import ConfigError
from ..diagnosis import diagnose
from ..treat._catalogue import CATALOGUE
from ._pool import Runner, Spec, default_workers
from ._prescription import Prescription
from ._ranking import rank
from ._treatment import NOT_RUN, Treatment, compatible, treatment
from ._trial import Batches, Build, LossOf, SupervisedLoss, Trial, run_trial

CONTROLS = ("lr_x0.3", "lower_learning_rate", "lr_warmup", "clip_norm")  # lr x0.3, lr x0.1, warmup, clipping


def doctor(build: Build, batches: Batches, loss_fn: Callable, steps: int = 200, *, top: int = 4,
           max_trials: Optional[int] = None, budget_s: Optional[float] = None, holdout: Optional[Batches] = None,
           out: Optional[str | Path] = None, workers: Optional[int] = None, seed: int = 0,
           progress: bool = True) -> Prescription:
    """Try the cures, measure them side by side, prescribe the one that works.

    Args:
      build: `build() -> (model, optimizer)`, a fresh model and optimizer each call (the torch seed is set
        before each call, so each trial starts from the same weights).
      batches: `batches() -> an iterator of (x, y)`, the same batches each call; called again when one runs out.
      loss_fn: `loss_fn(model(x), y) -> scalar loss`.
      steps: optimizer steps per trial (the baseline's too).
      top: how many of diagnose's ranked remedies to try (those it can apply, one per slot), before the controls
        (lr x0.3, lr x0.1, lr warmup, clip_norm) and one combination of the two best compatible ones.
      max_trials: at most this many trials besides the baseline (None: no limit).
      budget_s: stop starting trials once another (timed by the baseline) would end past this many seconds.
      holdout: `holdout() -> an iterator of (x, y)` held out from training; trials are then ranked by their
        mean loss on it instead of the training loss.
      out: directory for the run stores (one per trial) and prescription.json; default a new temporary one.
      workers: processes for the trials (default: one per spare core; 1 runs them here, in order).
      seed: the torch seed set before each `build()`.
      progress: a progress bar on stderr (when tqdm is installed and stderr is a terminal).
    Returns:
      A `Prescription`: `.baseline`, `.best`, `.trials` (best first), `.to_json()`.
    """
    _validate(build, batches, loss_fn, steps, top, max_trials, budget_s, workers, seed)
    return examine(build, batches, SupervisedLoss(loss_fn), steps, top=top, max_trials=max_trials, budget_s=budget_s,
                   holdout=holdout, out=out, workers=workers, seed=seed, progress=progress)


def examine(build: Build, batches: Batches, loss_of: LossOf, steps: int, *, top: int, max_trials: Optional[int],
            budget_s: Optional[float], holdout: Optional[Batches], out: Optional[str | Path], workers: Optional[int],
            seed: int, progress: bool) -> Prescription:
    """`doctor` for any loss: `loss_of(model, batch)` (arguments validated by the caller)."""
    t0 = time.perf_counter()
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="graddoctor-doctor-"))
    root.mkdir(parents=True, exist_ok=True)
    job = dict(build=build, batches=batches, loss_of=loss_of, steps=steps, seed=seed, holdout=holdout)
    baseline = run_trial("baseline", (), build, batches, loss_of, steps, root / "baseline", seed, holdout)
    if not baseline.findings:
        return _finish(Prescription(baseline, baseline, [baseline], True, steps, out=str(root)), root)
    findings = diagnose(baseline.run_dir)
    ids, not_tried = candidates([r.id for f in findings if f.severity != "info" for r in f.remedies], top)
    deadline = t0 + budget_s if budget_s is not None else float("inf")
    limit = max_trials if max_trials is not None else len(ids) + 1
    bar = _progress(progress, min(limit, len(ids) + 1))
    runner = Runner(job, workers or default_workers(), deadline, baseline.wall_s, lambda label: _tick(bar, label))
    try:
        singles, stopped = _run_capped(runner, [_spec(root, (i,)) for i in ids], limit)
        pairs: list[Trial] = []
        pair = best_pair(rank(singles, baseline))
        if pair and not stopped and len(singles) < limit:
            pairs, stopped = _run_capped(runner, [_spec(root, pair)], limit - len(singles))
        elif pair and not stopped:
            stopped = f"max_trials={max_trials} reached"
    finally:
        if bar is not None:
            bar.close()
    ranked = rank([baseline] + singles + pairs, baseline)
    rx = Prescription(baseline, ranked[0], ranked, False, steps, not_tried, stopped, out=str(root))
    return _finish(rx, root)


def candidates(ranked_ids: list[str], top: int) -> tuple[list[str], dict[str, str]]:
    """The first `top` remedies the doctor can run, in diagnose's order and one per slot (the first activation
    swap, the first norm, ...), then the controls not among them; and the remedies it passed over, with why."""
    ids: list[str] = []
    slots: set[str] = set()
    not_tried: dict[str, str] = {}
    for rid in dict.fromkeys(CATALOGUE[r].id for r in ranked_ids):
        t = treatment(rid)
        if t is None:
            not_tried[rid] = NOT_RUN.get(rid, "the doctor does not know how to apply it")
        elif len(ids) < top and t.slot not in slots:  # relu, leaky_relu, elu: one trial answers for the swap
            ids.append(rid)
            slots.add(t.slot)
    return ids + [c for c in CONTROLS if c not in ids], not_tried


def best_pair(ranked: list[Trial]) -> Optional[tuple[str, ...]]:
    """The best single remedy with the best one after it that changes another part of the run (among the
    top three that ran and stayed finite); None when there is no such pair."""
    good = [t.remedy for t in ranked if t.remedy != "baseline" and not t.nonfinite and "+" not in t.remedy][:3]
    for other in good[1:]:
        pair = (good[0], other)
        if compatible(_treatments(pair)):
            return pair
    return None


def _treatments(ids: tuple[str, ...]) -> tuple[Treatment, ...]:
    return tuple(t for t in (treatment(i) for i in ids) if t is not None)


def _spec(root: Path, ids: tuple[str, ...]) -> Spec:
    name = "+".join(ids)
    return Spec(name, _treatments(ids), root / ("trial_" + name.replace("+", "__")))


def _run_capped(runner: Runner, specs: list[Spec], limit: int) -> tuple[list[Trial], str]:
    """Run what max_trials and the budget allow; the second value says why the rest did not run."""
    n = runner.affordable(min(limit, len(specs)))
    stopped = ("" if n == len(specs) else f"budget: {len(specs) - n} trial(s) not run" if n < min(limit, len(specs))
               else f"max_trials reached: {len(specs) - n} trial(s) not run")
    return runner.run(specs[:n]), stopped


def _finish(rx: Prescription, root: Path) -> Prescription:
    rx.save(root)
    return rx


def _progress(enabled: bool, total: int):
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal; else None."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="trial", desc="graddoctor doctor", file=sys.stderr, dynamic_ncols=True)


def _tick(bar, label: str) -> None:
    if bar is not None:
        bar.set_postfix_str(label[-40:], refresh=False)
        bar.update(1)


def _validate(build, batches, loss_fn, steps, top, max_trials, budget_s, workers, seed) -> None:
    for name, fn in (("build", build), ("batches", batches), ("loss_fn", loss_fn)):
        if not callable(fn):
            raise ConfigError(f"{name}={fn!r} is not allowed: give a callable")
    for name, value, lo in (("steps", steps, 1), ("top", top, 0), ("max_trials", max_trials, 0),
                            ("workers", workers, 1), ("seed", seed, 0)):
        if value is None and name in ("max_trials", "workers"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name}={value!r} is not allowed: use an integer >= {lo}")
    if budget_s is not None and (isinstance(budget_s, bool) or not isinstance(budget_s, (int, float))
                                 or not budget_s > 0):
        raise ConfigError(f"budget_s={budget_s!r} is not allowed: use a number of seconds > 0, or None")
