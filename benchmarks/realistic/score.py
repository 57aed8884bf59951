"""Score graddoctor's diagnosis, and the plain threshold monitor, on the realistic labelled suite.

    .venv/bin/python -m benchmarks.realistic.score --out runs/realistic [--only NAME ...] [--fresh] [--json]

Trains each run of runs.py under `gd.watch` into `<out>/<name>` (a run already recorded there is kept unless
`--fresh`), diagnoses it with `gd.diagnose`, and prints one row per run: the expected codes, the codes found
at warning or above, the headline finding's cause and first remedy, and the verdicts:
- code: a broken run got one of its label's codes (healthy runs: -);
- cause / remedy: the headline finding's cause and first remedy are among the label's;
- applies: the first remedy, applied to a fresh model of the run (applies.py);
- false alarm: a healthy run got a warning, or a broken run a code outside its label's codes and `allow`;
- threshold: the threshold monitor's codes (baseline.py) and its verdict by the same code rules.
Then the totals. `--json` prints the rows and totals as strict JSON instead of the table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import graddoctor as gd
from graddoctor.diagnosis import RunData

from .applies import APPLIES, SNIPPET, check_remedy
from .baseline import threshold_codes
from .runs import BY_NAME, RUNS, RunSpec
from .train import recorded, train

ALARM = ("warning", "critical")


@dataclass
class Row:
    run: str
    arch: str
    expected: list[str]
    got: list[str]
    cause: str
    remedy: str
    code_right: Optional[bool]
    cause_right: Optional[bool]
    remedy_right: Optional[bool]
    applies: str
    false_alarm: list[str]
    critical: bool
    threshold: list[str]
    threshold_code_right: Optional[bool]
    threshold_false_alarm: list[str]
    steps: int
    findings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.expected

    @property
    def cured(self) -> bool:
        """Right cause and a right first remedy that applies (or is a change to the user's own code)."""
        return bool(self.cause_right and self.remedy_right and self.applies in (APPLIES, SNIPPET))


def score_run(spec: RunSpec, run_dir: Path) -> Row:
    """Diagnose a recorded run and judge it against its label."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        findings = gd.diagnose(run_dir)
        with gd.open_run(run_dir) as run:
            data = RunData.from_run(run)
    alarms = [f for f in findings if f.severity in ALARM]
    got = [f.code for f in alarms]
    label, head = spec.label, (alarms[0] if alarms else None)
    remedy = head.remedies[0].id if head and head.remedies else ""
    tcodes = sorted(threshold_codes(data))
    broken = not label.healthy
    return Row(
        run=spec.name, arch=spec.arch, expected=sorted(label.codes), got=got,
        cause=head.cause if head else "", remedy=remedy,
        code_right=bool(label.codes & set(got)) if broken else None,
        cause_right=(head is not None and head.cause in label.causes) if broken else None,
        remedy_right=(remedy in label.remedies) if broken else None,
        applies=check_remedy(spec, remedy) if remedy else "",
        false_alarm=_false(label, got), critical=any(f.severity == "critical" for f in findings),
        threshold=tcodes, threshold_code_right=bool(label.codes & set(tcodes)) if broken else None,
        threshold_false_alarm=_false(label, tcodes), steps=len(data.steps),
        findings=[{"code": f.code, "severity": f.severity, "cause": f.cause,
                   "remedies": [r.id for r in f.remedies]} for f in findings])


def _false(label: Any, codes: list[str]) -> list[str]:
    return sorted(set(codes) - label.codes - label.allow)


def totals(rows: list[Row]) -> dict[str, Any]:
    healthy = [r for r in rows if r.healthy]
    broken = [r for r in rows if not r.healthy]
    return {
        "runs": len(rows), "healthy": len(healthy), "broken": len(broken),
        "healthy_with_warnings": sum(bool(r.got) for r in healthy),
        "healthy_with_critical": sum(r.critical for r in healthy),
        "broken_code_right": sum(bool(r.code_right) for r in broken),
        "broken_cause_right": sum(bool(r.cause_right) for r in broken),
        "broken_remedy_right": sum(bool(r.remedy_right) for r in broken),
        "broken_cause_and_applicable_remedy": sum(r.cured for r in broken),
        "broken_false_alarms": sum(bool(r.false_alarm) for r in broken),
        "threshold_healthy_with_alarms": sum(bool(r.threshold) for r in healthy),
        "threshold_broken_code_right": sum(bool(r.threshold_code_right) for r in broken),
        "threshold_broken_false_alarms": sum(bool(r.threshold_false_alarm) for r in broken),
    }


def _yn(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "**no**")


def format_table(rows: list[Row]) -> str:
    """The markdown table and its totals, as BENCHMARKS.md shows them."""
    out = ["| run | expected | got (warning+) | cause | first remedy | code | cause | remedy | applies | "
           "false alarm | threshold monitor: got | threshold: code / false |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        thr = f"{_yn(r.threshold_code_right)} / {', '.join(r.threshold_false_alarm) or 'none'}"
        out.append(f"| {r.run} | {', '.join(r.expected) or '(healthy)'} | {', '.join(r.got) or '-'} | "
                   f"{r.cause or '-'} | {r.remedy or '-'} | {_yn(r.code_right)} | {_yn(r.cause_right)} | "
                   f"{_yn(r.remedy_right)} | {r.applies or '-'} | {', '.join(r.false_alarm) or 'none'} | "
                   f"{', '.join(r.threshold) or '-'} | {thr} |")
    t = totals(rows)
    pct = 100.0 * t["broken_cause_and_applicable_remedy"] / max(t["broken"], 1)
    out += ["", f"- healthy runs with a warning: graddoctor {t['healthy_with_warnings']} / {t['healthy']} "
            f"(target 0; with a critical finding: {t['healthy_with_critical']}); threshold monitor "
            f"{t['threshold_healthy_with_alarms']} / {t['healthy']}",
            f"- broken runs with a right code: graddoctor {t['broken_code_right']} / {t['broken']} (target all); "
            f"threshold monitor {t['threshold_broken_code_right']} / {t['broken']}",
            f"- broken runs with the right cause and an applicable right first remedy: "
            f"{t['broken_cause_and_applicable_remedy']} / {t['broken']} ({pct:.0f}%, target >= 90%); right cause "
            f"{t['broken_cause_right']}, right first remedy {t['broken_remedy_right']}",
            f"- broken runs with a code outside their label: graddoctor {t['broken_false_alarms']}, threshold "
            f"monitor {t['threshold_broken_false_alarms']}"]
    return "\n".join(out)


def available(spec: RunSpec) -> bool:
    """False for the HF runs when transformers is not installed (they are skipped, not failed)."""
    return spec.arch != "hf_gpt2" or importlib.util.find_spec("transformers") is not None


def run_suite(out: Path, only: Optional[list[str]] = None, fresh: bool = False, log=print) -> list[Row]:
    specs = [BY_NAME[n] for n in only] if only else RUNS
    rows = []
    for spec in specs:
        if not available(spec):
            log(f"skipped {spec.name}: transformers is not installed")
            continue
        run_dir = out / spec.name
        if fresh or not recorded(run_dir):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train(spec, run_dir)
        rows.append(score_run(spec, run_dir))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/realistic"), help="folder of the run directories")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these runs (names from runs.py)")
    ap.add_argument("--fresh", action="store_true", help="train again even where a run is recorded")
    ap.add_argument("--json", action="store_true", help="print strict JSON instead of the markdown table")
    args = ap.parse_args(argv)
    unknown = [n for n in args.only or () if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown run name(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    rows = run_suite(args.out, args.only, args.fresh, log)
    if args.json:
        doc = {"rows": [dict(asdict(r), cured=r.cured) for r in rows], "totals": totals(rows)}
        print(json.dumps(doc, indent=1, allow_nan=False))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
