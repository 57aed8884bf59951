"""The `graddoctor lab` and `graddoctor report` commands (registered in `graddoctor.cli.COMMANDS`)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .._errors import GradDoctorError
from ._types import PRESETS


def register_lab(sub: argparse._SubParsersAction) -> None:
    from ..cli import SEED_MAX, int_in
    p = sub.add_parser("lab",
                       help="reproduce every vanishing/exploding-gradient phenomenon and cure; write an HTML report")
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="quick (under a minute, for CI), default (a few minutes on 2 cores) or full")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments (see --list)")
    p.add_argument("--out", default="runs/lab", help="output directory (default runs/lab)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0,
                   help="random seed (default 0); same seed, same numbers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.set_defaults(func=_cmd_lab)


def format_experiment_list() -> str:
    from . import REGISTRY
    from ._types import ordered
    del REGISTRY  # importing the package registers the experiments
    return "\n".join(f"{e.name:<16} {e.title}" for e in ordered())


def _cmd_lab(args: argparse.Namespace) -> int:
    from ..cli import out_dir
    from . import format_summary_table, run_lab, select
    if args.list:
        print(format_experiment_list())
        return 0
    select(args.only)  # an unknown name is refused before the output directory is made
    lab = run_lab(preset=args.preset, only=args.only, seed=args.seed, out=out_dir(args.out),
                  progress=not args.no_progress)
    print(format_summary_table(lab.results))
    n_ok = sum(r.reproduced for r in lab.results)
    print(f"\n{n_ok}/{len(lab.results)} reproduced in {lab.seconds:.0f} s")
    print(f"report:  {lab.report}")
    print(f"results: {lab.results_json}")
    return 0


def register_report(sub: argparse._SubParsersAction) -> None:
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
