"""The lab's data types: an experiment, its context, and what it returns.

An experiment is a function `run(ctx) -> Result`, registered with a name, a
title and the published claim it reproduces. It trains real (tiny) models with
`graddoctor.watch`, writes every run under `ctx.out / name / ...`, and returns
measured numbers, a verdict computed from those numbers, and figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..report._figure import Figure

PRESETS = ("quick", "default", "full")


@dataclass
class Context:
    """What an experiment gets.

    Attributes:
      out: the lab's output directory; an experiment writes its runs under `out / name`.
      preset: "quick" (CI, seconds), "default" (a few minutes in all) or "full" (longer, closer to the papers).
      seed: the random seed; the same seed gives the same numbers.
      tick: called after each finished training run, with a short label (drives the progress bar).
    """

    out: Path
    preset: str
    seed: int
    tick: Callable[[str], None] = lambda label: None

    def pick(self, quick: Any, default: Any, full: Any) -> Any:
        """The value for the current preset."""
        return {"quick": quick, "default": default, "full": full}[self.preset]

    def run_dir(self, experiment: str, run: str) -> Path:
        return self.out / "runs" / experiment / run


@dataclass
class Result:
    """What an experiment measured.

    Attributes:
      name, title: as registered.
      claim: what the seeds / the paper say should happen.
      measured: one or two sentences with the measured numbers.
      reproduced: the verdict, computed from `metrics` by the experiment's own rule.
      metrics: the numbers (JSON-able; NaN/Inf allowed, written with `_nonfinite_json`).
      figures: plots for the report.
      runs: run directories (relative to the lab's out dir) recorded with watch.
      findings: run -> list of diagnose findings (dicts), when `graddoctor.diagnosis` is available.
      notes: extra remarks shown in the report (e.g. what is CPU-sized compared with the paper).
      seconds: wall time of the experiment; reference: the seeds / papers it reproduces.
      rule: in words, how `reproduced` is computed from `metrics`.
    """

    name: str
    title: str
    claim: str
    measured: str
    reproduced: bool
    metrics: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    findings: dict[str, list[dict]] = field(default_factory=dict)
    notes: str = ""
    seconds: float = 0.0
    reference: str = ""
    rule: str = ""


@dataclass(frozen=True)
class Experiment:
    """A registered experiment: `run(ctx)` returns a `Result`; `runs(preset)` counts its training runs."""

    name: str
    title: str
    claim: str
    reference: str
    run: Callable[[Context], Result]
    runs: Callable[[str], int]
    order: int = 0


REGISTRY: dict[str, Experiment] = {}


def experiment(name: str, title: str, claim: str, reference: str, runs: Callable[[str], int], order: int) -> Callable:
    """Decorator: register `fn(ctx) -> Result` as an experiment."""
    def wrap(fn: Callable[[Context], Result]) -> Callable[[Context], Result]:
        REGISTRY[name] = Experiment(name, title, claim, reference, fn, runs, order)
        return fn
    return wrap


def ordered() -> list[Experiment]:
    return sorted(REGISTRY.values(), key=lambda e: e.order)


def result(exp_name: str, measured: str, reproduced: bool, metrics: dict, figures: list[Figure],
           runs: list[Path], ctx: Context, notes: str = "", rule: str = "") -> Result:
    """Build a `Result` for a registered experiment (title and claim from the registry)."""
    e = REGISTRY[exp_name]
    rel = [str(Path(r).relative_to(ctx.out)) for r in runs]
    return Result(e.name, e.title, e.claim, measured, bool(reproduced), metrics, figures, rel, notes=notes,
                  reference=e.reference, rule=rule)

