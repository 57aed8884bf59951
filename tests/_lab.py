"""The quick lab run, shared by the whole session (see the `quick_lab_run` fixture in conftest.py).

`graddoctor lab --preset quick` runs once, in a subprocess (the real command end to end), into a
folder under pytest's tmp dir. conftest.py hands this module the session's `tmp_path_factory`
before any test runs; tests reach the run through the fixtures, never by importing a test module.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_factory = None  # the session's pytest TempPathFactory, set by conftest.py
_run: "tuple[Path, subprocess.CompletedProcess] | None" = None
_artifacts: "Path | None" = None


def set_tmp_path_factory(factory) -> None:
    global _factory
    _factory = factory


def _mktemp(name: str) -> Path:
    if _factory is None:
        raise RuntimeError("tests/_lab.py is used outside a pytest session (conftest.py sets its tmp dir)")
    return _factory.mktemp(name)


def quick_lab() -> tuple[Path, subprocess.CompletedProcess]:
    """Run `graddoctor lab --preset quick --seed 0` once per session; (output dir, completed process)."""
    global _run
    if _run is None:
        out = _mktemp("lab-quick") / "out"
        cmd = [sys.executable, "-m", "graddoctor.cli", "lab", "--preset", "quick", "--out", str(out), "--seed", "0"]
        _run = out, subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent)
    return _run


def artifacts_dir() -> Path:
    """Screenshots and other files a test leaves for a person to look at, under pytest's tmp dir."""
    global _artifacts
    if _artifacts is None:
        _artifacts = _mktemp("artifacts")
    return _artifacts
