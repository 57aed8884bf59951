"""Diagnose every run the lab recorded (runs designed for the lab, not for diagnose's tests).

    .venv/bin/graddoctor lab --preset quick --out /tmp/lab
    .venv/bin/python benchmarks/diagnose_lab_runs.py /tmp/lab/runs

Prints a markdown table: run, findings (cause). Runs with no finding are listed too.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

from graddoctor.store._store import STORE_NAME
from graddoctor.diagnosis import diagnose


def main(root: Path) -> None:
    runs = sorted(p.parent for p in root.rglob(STORE_NAME))
    print("| run | findings (cause) |")
    print("|---|---|")
    for run in runs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = diagnose(run)
        cell = ", ".join(f"{f.code} ({f.cause})" for f in found) or "-"
        print(f"| {run.relative_to(root)} | {cell} |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: diagnose_lab_runs.py LAB_OUT/runs")
    main(Path(sys.argv[1]))
