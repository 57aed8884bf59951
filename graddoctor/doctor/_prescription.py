"""Prescription: what the doctor found, every trial it ran, best first, and how it ranked them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store import _nonfinite_json
from ._ranking import TIE, cleared
from ._trial import Trial

FILE = "prescription.json"  # written into the doctor's output directory
SCORE_RULE = (f"non-finite or failed trials last; then the score (held-out loss if given, else the median of the "
              f"last 10% of training losses); scores within {TIE:.0%} of the best tie, broken by fewer critical "
              "findings left, then lower cost (training setting < init < model change; fewer remedies), then score")


@dataclass
class Prescription:
    """The doctor's answer.

    Attributes:
      baseline: the run as given. best: the trial to adopt (the baseline when it is healthy or nothing beat it).
      trials: every trial, the baseline among them, best first.
      healthy: the baseline had no finding at warning or above (then no remedy was tried).
      steps: steps per trial. not_tried: remedy id -> why it was not run. stopped: why trials stopped early
        ("" when every candidate ran). score_rule: the ranking, in words.
    """

    baseline: Trial
    best: Trial
    trials: list[Trial]
    healthy: bool
    steps: int
    not_tried: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    score_rule: str = SCORE_RULE
    out: str = ""

    @property
    def prescribed(self) -> bool:
        """A remedy is prescribed: the best trial is not the baseline."""
        return self.best is not self.baseline and self.best.remedy != "baseline"

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "prescribed": self.best.remedy if self.prescribed else None,
                "steps": self.steps, "score_rule": self.score_rule, "stopped": self.stopped,
                "not_tried": dict(self.not_tried), "out": self.out,
                "baseline": self.baseline.remedy, "best": self.best.remedy,
                "trials": [dict(t.to_dict(), cleared_critical=cleared(t, self.baseline)) for t in self.trials]}

    def to_json(self, indent: int | None = 1) -> str:
        """Strict JSON (no bare NaN/Infinity): non-finite floats are the strings "NaN", "Infinity", "-Infinity"."""
        return _nonfinite_json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "Prescription":
        d = _nonfinite_json.loads(text)
        trials = [Trial.from_dict(t) for t in d["trials"]]
        by_remedy = {t.remedy: t for t in trials}
        return cls(by_remedy[d["baseline"]], by_remedy[d["best"]], trials, bool(d["healthy"]), int(d["steps"]),
                   dict(d["not_tried"]), d["stopped"], d["score_rule"], d.get("out", ""))

    def save(self, out: Path) -> Path:
        path = Path(out) / FILE
        path.write_text(self.to_json())
        return path


def load_prescription(out: str | Path) -> Prescription:
    return Prescription.from_json((Path(out) / FILE).read_text())


def _num(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def format_prescription(rx: Prescription) -> str:
    """The prescription as text: the verdict, then one line per trial, best first."""
    b = rx.baseline
    head = [f"baseline: final loss {_num(b.final_loss)} over {len(b.losses)} steps; findings: "
            f"{', '.join(b.findings) or 'none'}" + (f" (critical: {', '.join(b.critical)})" if b.critical else "")]
    if rx.healthy:
        return "\n".join(head + ["healthy: no finding at warning or above, nothing prescribed."])
    if rx.prescribed:
        gain = f"{_num(rx.best.final_loss)} vs {_num(b.final_loss)}"
        head.append(f"prescription: {rx.best.remedy} (final loss {gain}; critical findings "
                    f"{'cleared' if cleared(rx.best, b) else 'left: ' + ', '.join(rx.best.critical)})")
    else:
        head.append("prescription: none of the remedies tried beat the baseline")
    rows = [f"{'#':>2}  {'remedy':<28} {'final loss':>10} {'held-out':>9} {'wall s':>7}  findings"]
    for i, t in enumerate(rx.trials, 1):
        found = t.error or ", ".join(t.findings) or "none"
        rows.append(f"{i:>2}  {t.remedy:<28} {_num(t.final_loss):>10} {_num(t.holdout_loss):>9} {t.wall_s:>7.2f}  "
                    f"{found}")
    tail = [f"ranking: {rx.score_rule}"]
    if rx.not_tried:
        tail.append("not tried: " + "; ".join(f"{k} ({v})" for k, v in rx.not_tried.items()))
    if rx.stopped:
        tail.append(f"stopped early: {rx.stopped}")
    return "\n".join(head + rows + tail)
