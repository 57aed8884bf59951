"""`graddoctor lab --preset quick` end to end, in a subprocess, once per test session.

Other lab tests import `quick_lab()` from here and assert on the numbers it wrote
to results.json, so the quick preset runs once for the whole suite.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from graddoctor.store import _nonfinite_json

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


@functools.lru_cache(maxsize=1)
def quick_lab() -> tuple[Path, subprocess.CompletedProcess]:
    """Run `graddoctor lab --preset quick` once; return (output dir, completed process)."""
    out = ARTIFACTS / f"lab-quick-{os.getpid()}"
    cmd = [sys.executable, "-m", "graddoctor.cli", "lab", "--preset", "quick", "--out", str(out), "--seed", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    return out, proc


def quick_results() -> dict[str, dict]:
    """name -> result dict from the quick run's results.json."""
    out, proc = quick_lab()
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = _nonfinite_json.loads((out / "results.json").read_text())
    return {r["name"]: r for r in data["results"]}


def test_lab_quick_end_to_end_writes_report_and_prints_summary():
    out, proc = quick_lab()
    assert proc.returncode == 0, proc.stderr[-3000:]
    from graddoctor.lab import REGISTRY
    names = set(REGISTRY)
    assert set(quick_results()) == names
    assert "report:" in proc.stdout and str(out / "report.html") in proc.stdout
    for name in names:  # the summary table lists every experiment
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://cdn" not in html and "<script" not in html.lower()
    assert len(html.encode()) < 6_000_000
    assert "graddoctor lab" in proc.stderr  # the progress bar


def test_every_experiment_recorded_its_runs_with_watch():
    from graddoctor import open_run
    out, _ = quick_lab()
    for name, r in quick_results().items():
        assert r["runs"], name
        for rel in r["runs"]:
            with open_run(out / rel) as run:
                assert run.num_steps > 0, rel


def test_lab_rejects_unknown_experiment_and_preset():
    from graddoctor.cli import main
    assert main(["lab", "--only", "no_such_experiment", "--out", str(ARTIFACTS / "never")]) == 2
    proc = subprocess.run([sys.executable, "-m", "graddoctor.cli", "lab", "--preset", "huge"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_lab_list_names_every_registered_experiment(capsys):
    from graddoctor.cli import main
    from graddoctor.lab import REGISTRY
    assert main(["lab", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert sorted(listed) == sorted(REGISTRY) and len(listed) == 10
