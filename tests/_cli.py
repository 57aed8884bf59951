"""The command line in this process: `graddoctor.cli.main` with its output captured.

One torch import for the whole suite instead of one per command. Tests where the process itself
matters (the console script's exit status, signals, a second process) start a real one instead.
"""
from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

from graddoctor.cli import main

# The installed console script next to this interpreter, for the few tests that run it for real.
EXE = shutil.which("graddoctor", path=str(Path(sys.executable).parent)) or "graddoctor"


def run(*args, check: bool = False) -> subprocess.CompletedProcess:
    """`graddoctor ARGS` in this process: a CompletedProcess with its exit status and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors
            code = e.code if isinstance(e.code, int) else 2
    done = subprocess.CompletedProcess(["graddoctor", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check:
        done.check_returncode()
    return done
