"""Run the lab: selected experiments, a progress bar, diagnose on every run, results.json and report.html.

    from graddoctor.lab import run_lab
    lab = run_lab(preset="quick", out="runs/lab")
    print(lab.report)
"""
from __future__ import annotations

import datetime
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .._errors import ConfigError
from ..report import findings_for, write_lab_report
from ..store import _nonfinite_json
from ._types import PRESETS, REGISTRY, Context, Result, ordered


@dataclass
class LabResult:
    """What `run_lab` produced: the results in report order and the files it wrote."""

    results: list[Result]
    report: Path
    results_json: Path
    seconds: float


def select(only: Optional[Sequence[str]]) -> list:
    """The experiments to run, in report order; `ConfigError` for an unknown name."""
    exps = ordered()
    if not only:
        return exps
    unknown = sorted(set(only) - set(REGISTRY))
    if unknown:
        raise ConfigError(f"unknown experiment(s) {unknown}; choose from {[e.name for e in exps]}")
    return [e for e in exps if e.name in set(only)]


def run_lab(preset: str = "default", only: Optional[Sequence[str]] = None, seed: int = 0,
            out: str | Path = "runs/lab", progress: bool = True, threads: int = 1) -> LabResult:
    """Run the experiments, diagnose every recorded run, write `results.json` and `report.html` under `out`.

    Args:
      preset: "quick" (under a minute, for CI), "default" (a few minutes on 2 cores) or "full".
      only: experiment names to run (default: all), see `graddoctor.lab.REGISTRY`.
      seed: random seed; the same seed and preset give the same numbers.
      out: output directory (runs under out/runs/, report at out/report.html).
      progress: draw a progress bar on stderr.
      threads: torch intra-op threads (1 keeps runs reproducible and leaves cores to other work).
    Returns:
      A `LabResult`.
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is not allowed: use one of {list(PRESETS)}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} is not allowed: use an integer >= 0")
    exps = select(only)
    try:
        from tqdm import tqdm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the lab needs tqdm: pip install 'graddoctor[lab]'") from err
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    bar = tqdm(total=sum(e.runs(preset) for e in exps), unit="run", desc="graddoctor lab", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)

    def tick(label: str) -> None:  # after each training run: one step, and its label beside the bar
        bar.set_postfix_str(label[-40:], refresh=False)
        bar.update(1)

    t0, results = time.perf_counter(), []
    try:
        for e in exps:
            t = time.perf_counter()
            with warnings.catch_warnings():
                # watch's live diagnosis warns as it trains; the lab shows every finding in the report instead.
                warnings.filterwarnings("ignore", message="graddoctor: ")
                r = e.run(Context(out=out, preset=preset, seed=seed, tick=tick))
            r.seconds = time.perf_counter() - t
            r.findings = _diagnose(out, r.runs)
            results.append(r)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - t0
    info = dict(preset=preset, seed=seed, seconds=seconds, torch=torch.__version__, experiments=[e.name for e in exps],
                created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    js = out / "results.json"
    js.write_text(_nonfinite_json.dumps(dict(info=info, results=[_jsonable(r) for r in results]), indent=1))
    report = write_lab_report(results, info, out / "report.html")
    return LabResult(results, report, js, seconds)


def _diagnose(out: Path, runs: list[str]) -> dict[str, list[dict]]:
    found = {}
    for rel in runs:
        items = findings_for(out / rel)
        if items is None:
            return {}
        found[rel] = items
    return found


def _jsonable(r: Result) -> dict:
    d = asdict(r)
    d["figures"] = [f.title for f in r.figures]  # the images live in the HTML only
    return d


def format_summary_table(results: Sequence[Result]) -> str:
    """A plain-text table: experiment, reproduced, measured."""
    width = max((len(r.name) for r in results), default=10)
    lines = [f"{'experiment'.ljust(width)}  reproduced  measured", "-" * (width + 80)]
    for r in results:
        lines.append(f"{r.name.ljust(width)}  {'yes' if r.reproduced else 'NO ':<10}  {r.measured}")
    return "\n".join(lines)
