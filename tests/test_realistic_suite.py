"""The realistic labelled suite's machinery (benchmarks/realistic): training, recording, scoring, totals.

Runs two of its cheapest runs through the same code path as `python -m benchmarks.realistic.score`: a
healthy LSTM language model and the ReLU RNN whose hidden state overflows. It does not assert today's
diagnosis of the broken run (the rules are being changed); only that the machinery works, that the numbers
it reports are those of the runs (the loop's own losses, the spec's step count, sums of the rows), and that
the healthy run gets no critical finding. The threshold monitor is checked against naive loops.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.realistic import baseline, score  # noqa: E402
from benchmarks.realistic.applies import SNIPPET, UNKNOWN, check_remedy  # noqa: E402
from benchmarks.realistic.runs import BY_NAME, RUNS  # noqa: E402
from benchmarks.realistic.train import MARKER  # noqa: E402

import graddoctor as gd  # noqa: E402

HEALTHY, BROKEN = "lstm_healthy_s0", "rnn_relu_nan"


def test_the_suite_is_labelled_as_the_issue_asks():
    assert len(RUNS) >= 20 and len(BY_NAME) == len(RUNS)
    assert {"gpt", "encoder", "hf_gpt2", "lstm", "cnn"} <= {r.arch for r in RUNS}
    for r in RUNS:
        if r.label.healthy:
            assert not r.label.causes and not r.label.remedies, r.name
        else:  # every broken run names its codes, causes and first remedies, and says why
            assert r.label.codes and r.label.causes and r.label.remedies and r.label.why, r.name
            assert not (r.label.codes & r.label.allow), r.name


def test_threshold_monitor_against_naive_loops():
    rng = np.random.default_rng(0)
    loss = np.exp(-np.arange(300) / 80) * 3 + 0.5 + 0.01 * rng.standard_normal(300)
    loss[150] = 40.0  # one spike
    loss[200] = math.nan
    naive_mean = np.full(300, np.nan)
    for t in range(50, 300):
        prev = [v for v in loss[t - 50:t] if math.isfinite(v)]
        naive_mean[t] = sum(prev) / len(prev)
    np.testing.assert_allclose(baseline.rolling_mean(loss, 50), naive_mean, rtol=1e-12, equal_nan=True)
    flat = np.concatenate([np.linspace(3, 1, 100), np.full(150, 1.0)])
    got = baseline.plateau(flat, 100, 0.01)
    for t in range(len(flat)):  # naive: best of the last 100 steps not 1% below the best before them
        want = t >= 100 and not min(flat[t - 99:t + 1]) < 0.99 * min(flat[:t - 99])
        assert got[t] == want, t


@pytest.mark.slow
def test_two_runs_through_the_scoring_path(tmp_path, capsys):
    rows = score.run_suite(tmp_path, [HEALTHY, BROKEN], log=lambda msg: None)
    healthy, broken = rows
    spec = BY_NAME[HEALTHY]
    marker = json.loads((tmp_path / HEALTHY / MARKER).read_text())
    with gd.open_run(tmp_path / HEALTHY) as run:
        steps, loss = run.loss()
    # the store holds every step of the loop, and the loss the loop computed (float32 storage)
    assert healthy.steps == spec.steps == len(steps) and list(steps.ravel()) == list(range(spec.steps))
    assert loss.ravel()[0] == pytest.approx(marker["first_loss"], rel=2 ** -23)
    assert loss.ravel()[-1] == pytest.approx(marker["last_loss"], rel=2 ** -23)
    assert marker["last_loss"] < marker["first_loss"]  # premise: the healthy twin learns
    assert not healthy.critical and healthy.code_right is None and healthy.cause_right is None
    # a broken run is judged on all three; its verdicts follow from its own row and label
    label = BY_NAME[BROKEN].label
    assert broken.code_right == bool(label.codes & set(broken.got))
    assert broken.cause_right == (broken.cause in label.causes)
    assert broken.remedy_right == (broken.remedy in label.remedies)
    t = score.totals(rows)
    assert (t["runs"], t["healthy"], t["broken"]) == (2, 1, 1)
    assert t["healthy_with_warnings"] == int(bool(healthy.got)) and t["broken_code_right"] == int(broken.code_right)
    assert t["broken_cause_and_applicable_remedy"] == int(broken.cured)
    # a recorded run is kept: scoring again trains nothing and gives the same rows
    stamp = (tmp_path / HEALTHY / MARKER).stat().st_mtime_ns
    assert score.run_suite(tmp_path, [HEALTHY, BROKEN], log=lambda msg: None) == rows
    assert (tmp_path / HEALTHY / MARKER).stat().st_mtime_ns == stamp
    # --json is strict JSON (no NaN) with the same totals
    assert score.main(["--out", str(tmp_path), "--only", HEALTHY, BROKEN, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert doc["totals"] == t and [r["run"] for r in doc["rows"]] == [HEALTHY, BROKEN]


@pytest.mark.slow
def test_remedy_check_applies_cures_to_a_fresh_model():
    spec = BY_NAME[HEALTHY]
    assert check_remedy(spec, "no_such_cure") == UNKNOWN
    assert check_remedy(spec, "lower_learning_rate") == SNIPPET
    assert check_remedy(spec, "clip_norm") == "applies"  # a guard built against the LSTM's parameters
    # the LSTM model has no nn.RNN: replacing one with an LSTM cannot apply
    assert check_remedy(spec, "rnn_to_lstm").startswith("fails: ")
    assert check_remedy(BY_NAME[BROKEN], "rnn_to_lstm") == "applies"
