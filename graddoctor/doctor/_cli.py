"""`graddoctor doctor SCRIPT.py` (registered in `graddoctor.cli.COMMANDS`): a thin layer over `gd.doctor`.

The script is run as a module (`runpy.run_path`, so its `if __name__ == "__main__":` block does not run)
and must define:
    build()    -> (model, optimizer), a fresh pair each call;
    batches()  -> an iterator of (x, y), the same batches each call;
    loss_fn(output, y) -> the scalar loss.
It may define `holdout()` (held-out batches, then trials are ranked on them).
"""
from __future__ import annotations

import argparse
import runpy
from pathlib import Path
from typing import Any

from .._errors import GradDoctorError

NEEDED = ("build", "batches", "loss_fn")


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import int_in
    p = sub.add_parser("doctor", help="try the remedies diagnose ranks on a training script, side by side, and "
                                      "prescribe the one that works")
    p.add_argument("script", metavar="SCRIPT.py", help="a Python file defining build(), batches() and loss_fn")
    p.add_argument("--steps", type=int_in(1, 1_000_000), default=200, help="training steps per trial (default 200)")
    p.add_argument("--budget", type=_seconds, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--max-trials", type=int_in(0, 10_000), default=None, help="at most this many trials")
    p.add_argument("--workers", type=int_in(1, 1024), default=None, help="processes (default: spare cores)")
    p.add_argument("--out", default="runs/doctor", help="directory for the trials' runs and prescription.json "
                                                        "(default runs/doctor)")
    p.add_argument("--json", action="store_true", help="print the prescription as JSON instead of text")
    p.set_defaults(func=_cmd_doctor)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use a number of seconds > 0")
    return value


def load_script(path: str) -> dict[str, Any]:
    """The script's globals, checked for build, batches and loss_fn; a GradDoctorError naming what is wrong."""
    if not Path(path).is_file():
        raise GradDoctorError(f"SCRIPT {path!r} is not a file: give a Python file defining {', '.join(NEEDED)}")
    try:
        space = runpy.run_path(path, run_name="graddoctor_doctor_script")
    except Exception as e:  # noqa: BLE001 - the user's script failed: one line naming it and the error
        raise GradDoctorError(f"SCRIPT {path!r} failed to run: {type(e).__name__}: {e}") from e
    missing = [n for n in NEEDED if not callable(space.get(n))]
    if missing:
        raise GradDoctorError(f"SCRIPT {path!r} does not define {', '.join(missing)}: it must define build() -> "
                              "(model, optimizer), batches() -> iterator of (x, y), and loss_fn(output, y)")
    return space


def _cmd_doctor(args: argparse.Namespace) -> int:
    from ..cli import out_dir
    from ._doctor import doctor
    from ._prescription import format_prescription
    space = load_script(args.script)
    out = out_dir(args.out)
    holdout = space.get("holdout") if callable(space.get("holdout")) else None
    rx = doctor(space["build"], space["batches"], space["loss_fn"], steps=args.steps, budget_s=args.budget,
                max_trials=args.max_trials, workers=args.workers, holdout=holdout, out=out)
    print(rx.to_json() if args.json else format_prescription(rx) + f"\nwritten: {out / 'prescription.json'}")
    return 0
