"""The `graddoctor report` command (registered in `graddoctor.cli.COMMANDS`): a thin layer over
`write_run_report`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .._errors import GradDoctorError


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import run_dir
    p = sub.add_parser("report", help="write a self-contained HTML report of recorded runs "
                                      "(heat map, profiles, loss, findings)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=run_dir,
                   help="run directories written by graddoctor.watch")
    p.add_argument("-o", "--output", default=None, help="HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=_cmd_report)


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either one missing (or unreadable): not the same existing file
        return False


def _cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_run_report
    from ..store._store import store_path
    out = Path(args.run_dirs[0]) / "report.html" if args.output is None else args.output
    if out == "":
        raise GradDoctorError("-o '' is not allowed: give a file name such as report.html")
    if os.path.isdir(out):
        raise GradDoctorError(f"-o {str(out)!r} is a directory: give a file name such as report.html")
    for rd in args.run_dirs:  # writing the page over a run's store would destroy the run
        store = store_path(rd)
        if any(_same_file(out, f) for f in (store, f"{store}-wal", f"{store}-shm")):
            raise GradDoctorError(f"-o {str(out)!r} is the run store of {rd!r}: "
                                  "give another file name such as report.html")
    print(write_run_report(args.run_dirs, out, args.title))
    return 0
