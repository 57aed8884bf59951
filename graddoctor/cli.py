"""The `graddoctor` command: a thin layer over the public API.

Library errors are caught once, in `main`, and turned into a message and exit code 2.
Each command is a (register, run) pair in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

from ._errors import GradDoctorError


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="inspect recorded runs")
    runs_sub = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    s = runs_sub.add_parser("summary", help="print a table of a run: steps, loss, norms per layer, non-finite steps")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by graddoctor.watch")
    s.set_defaults(func=_cmd_runs_summary)


def _cmd_runs_summary(args: argparse.Namespace) -> int:
    from ._run import open_run
    from ._summary import format_summary
    with open_run(args.run_dir) as run:
        print(format_summary(run))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a deep sigmoid MLP and a ReLU/He MLP with watch and print both summaries")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="directory for the two runs (default runs/demo)")
    p.add_argument("--steps", type=int, default=60, help="training steps per net (default 60)")
    p.add_argument("--depth", type=int, default=10, help="Linear layers per net (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo
    if args.steps < 1 or args.depth < 2:
        raise GradDoctorError(f"--steps={args.steps} --depth={args.depth}: need steps >= 1 and depth >= 2")
    print(run_demo(args.out, steps=args.steps, depth=args.depth, seed=args.seed))
    return 0


# Each verb registers its own sub-command here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_runs, _add_demo]

from .lab._cli import register_lab, register_report  # noqa: E402  (lab and report verbs)
COMMANDS += [register_lab, register_report]

from .diagnose._cli import register as register_diagnose  # noqa: E402  (diagnose verb)
COMMANDS += [register_diagnose]

from .serve import register as register_serve  # noqa: E402  (serve verb: the live dashboard)
COMMANDS += [register_serve]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graddoctor", description="Find, explain and fix vanishing and exploding gradients in PyTorch training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GradDoctorError as e:
        print(f"graddoctor: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
