"""The `graddoctor lab` command (registered in `graddoctor.cli.COMMANDS`)."""
from __future__ import annotations

import argparse

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
