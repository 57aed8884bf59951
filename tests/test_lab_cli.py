"""`graddoctor lab --preset quick` end to end, in a subprocess, once per test session.

The run is the session fixture `quick_lab_run` (conftest.py, under pytest's tmp dir); the lab tests
in other modules read its results.json through `quick_lab_results`.
"""
from __future__ import annotations

import pytest
from _cli import run


def test_lab_rejects_unknown_experiment_and_preset(tmp_path):
    from graddoctor.cli import main
    assert main(["lab", "--only", "no_such_experiment", "--out", str(tmp_path / "never")]) == 2
    proc = run("lab", "--preset", "huge")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_lab_list_names_every_registered_experiment(capsys):
    from graddoctor.cli import main
    from graddoctor.lab import REGISTRY
    assert main(["lab", "--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert sorted(listed) == sorted(REGISTRY) and len(listed) == 12


@pytest.mark.slow
def test_lab_quick_end_to_end_writes_report_and_prints_summary(quick_lab_run, quick_lab_results):
    out, proc = quick_lab_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    from graddoctor.lab import REGISTRY
    names = set(REGISTRY)
    assert set(quick_lab_results) == names
    assert "report:" in proc.stdout and str(out / "report.html") in proc.stdout
    for name in names:  # the summary table lists every experiment
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "http://" not in html and "https://cdn" not in html and "<script" not in html.lower()
    assert len(html.encode()) < 6_000_000
    assert "graddoctor lab" in proc.stderr  # the progress bar


@pytest.mark.slow
def test_every_experiment_recorded_its_runs_with_watch(quick_lab_run, quick_lab_results):
    from graddoctor import open_run
    out, _ = quick_lab_run
    for name, r in quick_lab_results.items():
        assert r["runs"], name
        for rel in r["runs"]:
            with open_run(out / rel) as run_:
                assert run_.num_steps > 0, rel
