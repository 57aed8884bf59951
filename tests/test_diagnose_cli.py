"""`graddoctor diagnose` as CI pipelines call it: its text, its JSON and its exit status.

The command runs in this process (`graddoctor.cli.main`, output captured); one test runs the installed
console script, where the process's own exit status is the point.
"""
from __future__ import annotations

import json
import subprocess

import pytest

import graddoctor as gd
from graddoctor.store import _nonfinite_json

from _cli import EXE, run
from _diag_runs import by_name, train


@pytest.fixture(scope="module")
def runs(labelled_runs, tmp_path_factory):
    # the labelled runs are shared with test_diagnose_runs (conftest.py: trained once per session)
    runs = {n: labelled_runs[n][0] for n in ("nan_batch", "outlier_batch", "healthy_slow_sgd")}
    runs["clipped"] = train(by_name("healthy_slow_sgd"), tmp_path_factory.mktemp("diag_cli") / "clipped",
                            live_diagnosis=False,
                            guard=gd.treat.clip_norm(0.05))  # clips every step: global norm is ~0.4
    return runs


def cli(*args):
    return run("diagnose", *args)


def test_text_report_groups_by_severity_with_layers_and_numbers(runs):
    p = cli(runs["nan_batch"])
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.index("CRITICAL") < out.index("nonfinite_gradient")
    assert "cause: data" in out and "4.weight" in out and "step 90" in out
    assert "sanitize_inputs" in out and "remedies (best first)" in out


def test_json_document_follows_the_documented_schema(runs):
    p = cli(runs["nan_batch"], "--json")
    assert p.returncode == 0, p.stderr

    def no_bare_constants(token):
        raise AssertionError(f"bare {token} in JSON output")
    doc = json.loads(p.stdout, parse_constant=no_bare_constants)  # strict JSON: NaN/Inf only as strings
    assert doc["schema"] == "graddoctor.diagnosis/1" and doc["steps"] == 150
    assert set(doc["counts"]) == {"info", "warning", "critical"}
    keys = {"code", "severity", "first_step", "last_step", "layers", "evidence", "cause", "message", "remedies"}
    for f in doc["findings"]:
        assert set(f) == keys
        assert all(set(r) - {"aliases"} == {"id", "why", "snippet"} for r in f["remedies"])
    want = [f.to_dict() for f in gd.diagnose(runs["nan_batch"])]
    assert _nonfinite_json.loads(p.stdout)["findings"] == _nonfinite_json.loads(_nonfinite_json.dumps(want))
    assert doc["interventions"] == []


def test_interventions_of_a_guarded_run_are_listed(runs):
    p = cli(runs["clipped"], "--json")
    what = {i["what"]: i for i in json.loads(p.stdout)["interventions"]}
    clip = next(v for k, v in what.items() if k.startswith("clip_norm"))
    assert clip["steps"] == 150 and clip["first_step"] == 0


@pytest.mark.parametrize("name, fail_on, status", [
    ("nan_batch", "critical", 1), ("outlier_batch", "critical", 0), ("outlier_batch", "warning", 1)])
def test_fail_on_sets_the_exit_status(runs, name, fail_on, status):
    assert cli(runs[name], "--fail-on", fail_on).returncode == status


def test_set_overrides_a_threshold(runs):
    default = {f["code"] for f in json.loads(cli(runs["outlier_batch"], "--json").stdout)["findings"]}
    raised = json.loads(cli(runs["outlier_batch"], "--json", "--set", "spike_z=1e9", "--set", "trend_min_steps=30").stdout)
    assert "loss_spike" in default and "loss_spike" not in {f["code"] for f in raised["findings"]}
    p = cli(runs["outlier_batch"], "--set", "no_such_threshold=1")
    assert p.returncode == 2 and "no_such_threshold" in p.stderr


def test_healthy_run_says_so_and_bad_paths_exit_2(runs, tmp_path):
    p = cli(runs["healthy_slow_sgd"], "--fail-on", "warning")
    assert p.returncode == 0 and "no findings" in p.stdout
    p = cli(tmp_path / "missing")
    assert p.returncode == 2 and "missing" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_the_console_script_exits_1_on_a_finding_at_the_fail_on_level(runs):
    p = subprocess.run([EXE, "diagnose", str(runs["nan_batch"]), "--fail-on", "critical"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1 and "nonfinite_gradient" in p.stdout, p.stderr
