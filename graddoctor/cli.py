"""The `graddoctor` command: a thin layer over the public API.

Every error a user can cause ends in one line on stderr, `graddoctor: error: ...`, naming the bad
value and what is allowed, and exit status 2 (argparse's errors too); Ctrl-C ends in one line and
status 130. Library errors (`GradDoctorError`) are caught once, in `main`, as are the operating
system's refusals to read or write a path (`OSError`).
Each command is a (register, run) pair in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

from ._errors import GradDoctorError

EXIT_ERROR = 2          # bad input or a failed read/write (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
SEED_MAX = 2 ** 32 - 1  # the seeds numpy's and torch's generators all take


class Parser(argparse.ArgumentParser):
    """argparse, with each usage error as one line (usage and help are one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"graddoctor: error: {one_line(message)} (see: {self.prog} --help)\n")


def one_line(text: str) -> str:
    """A message as one line (an error from below may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer from lo to hi, or an error naming the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer from {lo} to {hi}")
        return value
    parse.__name__ = "integer"
    return parse


def run_dir(text: str) -> str:
    """An argparse type for RUN_DIR: refuses the empty name (which Path would read as the current directory)."""
    if text == "":
        raise argparse.ArgumentTypeError("'' is not allowed: give the path of a run directory made by graddoctor.watch")
    return text


def out_dir(path: str, option: str = "--out") -> Path:
    """The output directory of a command, created now, before any work: a `GradDoctorError` naming
    the path for an empty name, a file, or a directory that cannot be created or written."""
    if path == "":
        raise GradDoctorError(f"{option} '' is not allowed: give a directory (it is created if missing)")
    out = Path(path)
    if os.path.exists(out) and not os.path.isdir(out):
        raise GradDoctorError(f"{option} {path!r} is a file, not a directory: "
                              "give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradDoctorError(f"{option} {path!r} cannot be created: {e.strerror or e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise GradDoctorError(f"{option} {path!r} is not writable: give a directory you can write to")
    return out


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="inspect recorded runs")
    runs_sub = p.add_subparsers(dest="runs_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.error("the following arguments are required: ACTION"))
    s = runs_sub.add_parser("summary", help="print a table of a run: steps, loss, norms per layer, non-finite steps")
    s.add_argument("run_dir", metavar="RUN_DIR", type=run_dir, help="a run directory written by graddoctor.watch")
    s.set_defaults(func=_cmd_runs_summary)


def _cmd_runs_summary(args: argparse.Namespace) -> int:
    from .report._summary import format_summary
    from .store._run import open_run
    with open_run(args.run_dir) as run:
        print(format_summary(run))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a deep sigmoid MLP and a ReLU/He MLP with watch and print both summaries")
    p.add_argument("--out", default="runs/demo", help="directory for the two runs (default runs/demo)")
    p.add_argument("--steps", type=int_in(1, 1_000_000), default=60, help="training steps per net (default 60)")
    p.add_argument("--depth", type=int_in(2, 1000), default=10, help="Linear layers per net (default 10)")
    p.add_argument("--seed", type=int_in(0, SEED_MAX), default=0, help="random seed (default 0)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .lab import _demo
    out = out_dir(args.out)
    print(_demo.run_demo(out, steps=args.steps, depth=args.depth, seed=args.seed))
    return 0


# Each verb registers its own sub-command here.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_runs, _add_demo]

from .lab._cli import register_lab  # noqa: E402  (lab verb)
from .report._cli import register as register_report  # noqa: E402  (report verb)

COMMANDS += [register_lab, register_report]

from .diagnosis._cli import register as register_diagnose  # noqa: E402  (diagnose verb)

COMMANDS += [register_diagnose]

from .serve import register as register_serve  # noqa: E402  (serve verb: the live dashboard)

COMMANDS += [register_serve]

from .doctor._cli import register as register_doctor  # noqa: E402  (doctor verb)

COMMANDS += [register_doctor]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="graddoctor",
                    description="Find, explain and fix vanishing and exploding gradients in PyTorch training.")
    # Sub-parsers are `Parser`s too. A missing COMMAND is refused in `main`, after unknown options, so
    # that `graddoctor --bogus` names --bogus.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run one command; returns its exit status (argparse's own errors exit with status 2)."""
    _printable_paths()
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)  # a usage error exits here, with status 2
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.error("the following arguments are required: COMMAND")
        return int(args.func(args) or 0)
    except GradDoctorError as e:
        return _fail(str(e))
    except BrokenPipeError:  # the reader of our output went away (`graddoctor diagnose RUN | head`)
        _quiet_stdout()
        return EXIT_ERROR
    except OSError as e:  # a path the command reads or writes that the system refuses
        what = f"{os.fsdecode(e.filename)!r}: " if e.filename is not None else ""
        return _fail(f"{what}{e.strerror or e}")
    except MemoryError as e:  # numpy says how much it tried to allocate
        return _fail(f"out of memory: {e or 'an allocation failed'}")
    except KeyboardInterrupt:
        print("graddoctor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _fail(message: str) -> int:
    print(f"graddoctor: error: {one_line(message)}", file=sys.stderr)
    return EXIT_ERROR


def _printable_paths() -> None:
    """Print paths that are not UTF-8 (bytes Python keeps as lone surrogates) with backslash escapes
    instead of failing with UnicodeEncodeError; stderr does so already."""
    if getattr(sys.stdout, "errors", None) == "strict" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so flushing it at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
