"""The labelled table: real small training runs, each with the finding codes it must and must not get.

Every scenario in tests/_diag_runs.py is trained once per session (a second or two each, CPU; the
`labelled_runs` fixture in conftest.py).
Offline: `diagnose(run_dir)` must give every expected code, no forbidden code, and the expected
cause. Live: the findings reported at flush time while training must also stay inside what the
run may get, each code reported once, and each stored as a "finding" event.
"""
from __future__ import annotations

import pytest
import torch

import graddoctor as gd
from graddoctor.diagnosis import CATALOGUE

from _diag_runs import SCENARIOS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(labelled_runs):
    """name -> (run_dir, findings reported live while training, FindingWarnings raised): conftest.py's
    `labelled_runs`, each scenario trained once per session (test_diagnose_cli reads three of them)."""
    return labelled_runs


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_offline_diagnosis_matches_the_label(trained, sc):
    run_dir, _, _ = trained[sc.name]
    findings = gd.diagnose(run_dir)
    codes = {f.code for f in findings}
    assert sc.expect <= codes, f"{sc.name}: missing {sorted(sc.expect - codes)}; got {sorted(codes)}"
    assert not codes & sc.forbid, f"{sc.name}: forbidden {sorted(codes & sc.forbid)}; got {sorted(codes)}"
    by_code = {f.code: f for f in findings}
    for code, cause in sc.causes.items():
        assert by_code[code].cause == cause, f"{sc.name}/{code}: cause {by_code[code].cause!r}, expected {cause!r}"
    for f in findings:
        assert f.remedies, f"{sc.name}/{f.code} has no remedy"
        assert all(r.id in CATALOGUE for r in f.remedies)
        assert f.evidence.get("reasoning"), f"{sc.name}/{f.code} gives no reasoning for its cause"
        assert f.first_step <= f.last_step


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_live_findings_are_reported_once_and_stored(trained, sc):
    run_dir, live, caught = trained[sc.name]
    codes = [f.code for f in live]
    assert not set(codes) & sc.forbid, f"{sc.name}: live reported forbidden {sorted(set(codes) & sc.forbid)}"
    assert len(caught) == len(live)  # one warning per reported finding
    with gd.open_run(run_dir) as run:
        stored = [e["data"]["code"] for e in run.events("finding")]
    assert stored == codes
    non_episodic = [c for c in codes if c not in ("loss_spike", "input_outlier", "large_weight_update")]
    assert len(non_episodic) == len(set(non_episodic)), f"{sc.name}: reported twice: {codes}"
    if sc.healthy:
        assert live == []


def test_the_table_covers_every_code_and_enough_healthy_nets():
    from graddoctor.diagnosis import CODES
    expected = set().union(*(s.expect for s in SCENARIOS))
    assert expected == set(CODES)
    assert sum(s.healthy for s in SCENARIOS) >= 4 and len(SCENARIOS) >= 14


def test_exploding_fires_before_the_run_turns_nonfinite(trained):
    run_dir, _, _ = trained["lr_too_high"]
    by_code = {f.code: f for f in gd.diagnose(run_dir)}
    first_bad = by_code["nonfinite_gradient"].first_step
    with gd.open_run(run_dir) as run:
        steps, norm = run.global_norm()
    assert by_code["exploding_gradient"].first_step < first_bad
    assert bool(torch.isfinite(torch.as_tensor(norm[steps == by_code["exploding_gradient"].first_step])).all())


def test_nan_batch_names_the_input_first(trained):
    run_dir, _, _ = trained["nan_batch"]
    f = {f.code: f for f in gd.diagnose(run_dir)}["nonfinite_gradient"]
    assert f.first_step == 90 and f.evidence["first_nonfinite"] == "input" and f.cause == "data"
    # backward order: the output layer's tensors come first
    assert f.layers[0].startswith("4.") and f.layers[-1].startswith("0.")
