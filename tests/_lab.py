"""The quick lab run, shared by the whole session (see the `quick_lab_run` fixture in conftest.py).

`graddoctor lab --preset quick` runs once, in a subprocess (the real command end to end), into a
folder under pytest's tmp dir. conftest.py hands this module the session's `tmp_path_factory`, starts
the run in the background when the session has tests that read it (they are ordered last), and stops
it at the end of the session; tests reach the run through the fixtures, never by importing a test module.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_factory = None  # the session's pytest TempPathFactory, set by conftest.py
_started: "tuple[Path, subprocess.Popen, Path] | None" = None  # (out dir, process, folder of its output files)
_run: "tuple[Path, subprocess.CompletedProcess] | None" = None
_artifacts: "Path | None" = None


def set_tmp_path_factory(factory) -> None:
    global _factory
    _factory = factory


def _mktemp(name: str) -> Path:
    if _factory is None:
        raise RuntimeError("tests/_lab.py is used outside a pytest session (conftest.py sets its tmp dir)")
    return _factory.mktemp(name)


def start_quick_lab() -> None:
    """Start `graddoctor lab --preset quick --seed 0` in the background, once (later calls do nothing)."""
    global _started
    if _started is not None:
        return
    base = _mktemp("lab-quick")
    out = base / "out"
    cmd = [sys.executable, "-m", "graddoctor.cli", "lab", "--preset", "quick", "--out", str(out), "--seed", "0"]
    # output to files, not pipes: nobody reads them until the run ends, and a full pipe would stall it
    with open(base / "stdout.txt", "w") as so, open(base / "stderr.txt", "w") as se:
        _started = out, subprocess.Popen(cmd, stdout=so, stderr=se, cwd=base), base


def quick_lab() -> tuple[Path, subprocess.CompletedProcess]:
    """The quick lab run (started now if it was not): waits for it; (output dir, completed process)."""
    global _run
    if _run is None:
        start_quick_lab()
        out, proc, base = _started
        try:
            proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
            stop_quick_lab()
            raise
        _run = out, subprocess.CompletedProcess(proc.args, proc.returncode, (base / "stdout.txt").read_text(),
                                                (base / "stderr.txt").read_text())
    return _run


def stop_quick_lab() -> None:
    """End the run if it is still going (a session that ends before its lab tests ran, or was interrupted)."""
    if _started is not None and _started[1].poll() is None:
        _started[1].kill()
        _started[1].wait()


def reads_the_quick_lab(item) -> bool:
    """Whether a collected test reads the quick lab run (through the fixtures)."""
    return bool({"quick_lab_run", "quick_lab_results"} & set(getattr(item, "fixturenames", ())))


def artifacts_dir() -> Path:
    """Screenshots and other files a test leaves for a person to look at, under pytest's tmp dir."""
    global _artifacts
    if _artifacts is None:
        _artifacts = _mktemp("artifacts")
    return _artifacts
