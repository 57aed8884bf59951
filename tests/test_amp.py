"""Mixed precision: watch with a GradScaler records true gradients, and diagnose tells the steps the
scaler skipped for an overflow of its loss scale from real non-finite gradients.

Every run here is real float16 autocast training on the CPU through a real `torch.amp.GradScaler`;
started at a loss scale of 2**24 it overflows for its first steps and halves its scale until the
gradients fit, as it does on a GPU. The oracle is a twin run without watch that unscales by hand
and reads the scale through GradScaler's public API.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from _cli import run as run_cli
from _numerics import norm_rel, rel_diff_tol, total_norm_rel
from graddoctor import ConfigError

# The model's gradients measured by watch (native kernel or PyTorch) and by get_total_norm: the same
# values (a GradScaler unscales by a power of 2, exactly), each total within its float32 bound.
_T_REL = total_norm_rel(norm_rel(64 * 16), 4)
NORM_RTOL = rel_diff_tol(_T_REL, _T_REL)


def _train(run_dir, steps=40, *, watch=True, pass_scaler=True, unscale_in_loop=False, nan_input_at=None,
           backward_nan_every=None, enabled=True, on_finding=None):
    """Train; returns (model, per-step oracle rows: scale taken, overflow 0/1, total gradient norm after unscaling)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24, enabled=enabled)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    w = None
    if watch:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = gd.watch(model, opt, run_dir, flush_every=10, scaler=scaler if pass_scaler else None,
                         on_finding=on_finding)
    oracle = []
    for i in range(steps):
        xb = x.clone()
        if i == nan_input_at:
            xb[0, 0] = math.nan
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(xb)
        loss = nn.functional.cross_entropy(out.float(), y)
        if backward_nan_every and i % backward_nan_every == 0:
            # finite forward (sqrt(0) = 0), infinite backward: d sqrt(u)/du at u = 0
            loss = loss + torch.sqrt((out.float() - out.float().detach()).abs()).sum()
        opt.zero_grad()
        scaler.scale(loss).backward()
        if unscale_in_loop or w is None:
            scaler.unscale_(opt)
        if w is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                w.step(loss)
        taken = scaler.get_scale()
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        scaler.step(opt)
        scaler.update()
        oracle.append((taken, float(enabled and scaler.get_scale() < taken), norm))  # a skipped step halves the scale
    if w is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w.close()
    return model, np.array(oracle)


@pytest.mark.slow
def test_watch_records_true_gradients_and_the_scale_of_each_step(tmp_path):
    twin, oracle = _train(None, watch=False)
    assert 3 <= oracle[:, 1].sum() < len(oracle) / 2, "premise: the scale calibrates by overflowing a few steps"
    for name, unscale_in_loop in (("watch-unscales", False), ("loop-unscales", True)):
        model, _ = _train(tmp_path / name, unscale_in_loop=unscale_in_loop)
        for a, b in zip(model.parameters(), twin.parameters()):  # watch changes nothing in the training
            assert torch.equal(a, b)
        with gd.open_run(tmp_path / name) as run:
            steps, amp = run.amp()
            _, total = run.global_norm()
            assert run.meta["amp_scaler"]["init_scale"] == 2.0 ** 24 and run.meta["amp_fields"] == ["scale", "overflow"]
        assert list(steps) == list(range(len(oracle)))
        np.testing.assert_array_equal(amp[:, 0], oracle[:, 0])  # powers of two: exact
        np.testing.assert_array_equal(amp[:, 1], oracle[:, 1])
        # unscaled: the true gradients; NaN/Inf on the overflow steps, at the same steps (assert_allclose checks)
        np.testing.assert_allclose(total, oracle[:, 2], rtol=NORM_RTOL, atol=0)
        summary = run_cli("runs", "summary", tmp_path / name)
        skipped = ", ".join(str(s) for s in np.flatnonzero(oracle[:, 1]))
        assert (f"AMP loss scale: {oracle[0, 0]:.3g} at step 0 -> {oracle[-1, 0]:.3g} at step {len(oracle) - 1}; "
                f"steps the GradScaler skipped for an overflow: {skipped}") in summary.stdout, summary.stdout


def test_scale_overflows_are_a_note_not_a_critical_finding(tmp_path):
    _, oracle = _train(None, watch=False)
    live = []
    _train(tmp_path / "amp", on_finding=live.append)
    findings = gd.diagnose(tmp_path / "amp")
    assert [(f.code, f.severity) for f in findings] == [("nonfinite_gradient", "info")]
    note = findings[0]
    skipped = np.flatnonzero(oracle[:, 1])
    assert note.evidence["amp_scale_overflow_steps"] == len(skipped) and note.remedies == ()
    assert (note.first_step, note.last_step) == (skipped[0], skipped[-1])
    assert note.evidence["first_scale"] == 2.0 ** 24 and note.evidence["last_scale"] == oracle[-1, 0]
    assert "nothing to do" in note.message and note.evidence["action_needed"] is False
    assert [f.severity for f in live] == ["info"]  # live diagnosis raised no alarm either
    # Without the scaler, watch cannot tell the overflows from real ones: a critical false alarm.
    _train(tmp_path / "no-scaler", pass_scaler=False, unscale_in_loop=True)
    assert [(f.code, f.severity) for f in gd.diagnose(tmp_path / "no-scaler")] == [("nonfinite_gradient", "critical")]


def test_a_nan_batch_under_amp_is_still_critical_and_blamed_on_the_data(tmp_path):
    _, oracle = _train(None, watch=False, nan_input_at=25)
    assert oracle[25, 1] == 1, "premise: the scaler skipped the NaN batch's step too"
    live = []
    _train(tmp_path / "nan", nan_input_at=25, on_finding=live.append)
    # Live: the calibration note at the first flush does not hide the NaN batch at a later one.
    assert [f.severity for f in live if f.code == "nonfinite_gradient"] == ["info", "critical"]
    f = {f.code: f for f in gd.diagnose(tmp_path / "nan")}["nonfinite_gradient"]
    assert f.severity == "critical" and f.cause == "data" and f.first_step == 25
    assert f.evidence["first_nonfinite"] == "input"
    assert f.evidence["amp_scale_overflow_steps"] == oracle[:, 1].sum() - 1  # all but the NaN batch's


@pytest.mark.parametrize("every, severity", [(5, "warning"), (1, "critical")])
def test_a_scale_that_never_settles_is_a_warning_and_one_that_skips_everything_critical(tmp_path, every, severity):
    _, oracle = _train(None, watch=False, backward_nan_every=every, steps=60)
    calibration = 0
    while calibration < len(oracle) and oracle[calibration, 1]:  # the leading overflows, counted by hand
        calibration += 1
    after = oracle[calibration:, 1]
    if severity == "warning":
        assert 0.05 < after.mean() <= 0.5, "premise: every 5th step overflows after calibration"
    else:
        assert len(after) == 0 and oracle[:, 0].min() < 1, "premise: every step overflows, down to a scale below 1"
    _train(tmp_path / "run", backward_nan_every=every, steps=60)
    findings = gd.diagnose(tmp_path / "run")
    f = {f.code: f for f in findings}["nonfinite_gradient"]
    assert f.severity == severity and f.evidence["action_needed"] is True and f.remedies
    assert f.evidence["calibration_steps"] == calibration
    if len(after):
        # diagnose reports the fraction rounded to 4 decimals: within half of 1e-4 (and an ulp)
        assert f.evidence["overflow_fraction_after_calibration"] == pytest.approx(after.mean(), abs=0.5e-4 + 1e-15)
    assert f.evidence["amp_scale_overflow_steps"] == oracle[:, 1].sum()


def test_bad_scaler_input_is_refused_and_a_disabled_scaler_records_nothing(tmp_path):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="scaler='x' is not allowed: give the torch.amp.GradScaler"):
        gd.watch(model, opt, tmp_path / "a", scaler="x")
    with pytest.raises(ConfigError, match="scaler= needs the optimizer too"):
        gd.watch(model, None, tmp_path / "b", scaler=torch.amp.GradScaler("cpu"))
    scaler = torch.amp.GradScaler("cpu")
    w = gd.watch(model, opt, tmp_path / "c", scaler=scaler)
    with pytest.raises(RuntimeError, match="scaled no loss yet"):
        model(torch.randn(3, 4)).sum().backward()
        w.step()
    loss = model(torch.randn(3, 4)).sum()
    scaler.scale(loss).backward()
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after scaler.step"):
        w.step(loss)
    w.close()
    model, oracle = _train(tmp_path / "off", enabled=False, steps=12)
    with gd.open_run(tmp_path / "off") as run:
        assert len(run.amp()[0]) == 0 and run.meta["amp_scaler"] is None
        np.testing.assert_allclose(run.global_norm()[1], oracle[:, 2], rtol=NORM_RTOL, atol=0)
    with pytest.raises(ConfigError, match="amp_overflow_fraction=2 is not allowed"):
        gd.diagnose(tmp_path / "off", amp_overflow_fraction=2)


def test_no_host_sync_inside_a_step_with_a_scaler(tmp_path, monkeypatch):
    # As tests/test_watch.py's proof: on the meta device every read of a value raises.
    # watch refuses a meta-device model with a run_dir (nothing could be written); this proof needs
    # it to record, so the refusal is lifted here and the flush is expected to fail.
    monkeypatch.setattr("graddoctor.core._watch.check_measurable", lambda *a: None)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).to("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("meta")
    w = gd.watch(model, opt, tmp_path, flush_every=1000, scaler=scaler, guard=gd.clip_norm(1.0))
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.randn(4, 6, device="meta")).pow(2).mean()
        scaler.scale(loss).backward()
        w.step(loss)
        opt.step()  # scaler.step would read found_inf on the host (its own sync, not watch's)
        scaler.update()
    assert w.step_index == 3 and len(w._buf["amp"][1]) == 3
    with pytest.raises(Exception):
        w.flush()  # the one sync point does read values, and so fails on meta
    w._reset_buffers()  # nothing on meta can be written: drop it, and close the store
    w.close()


@pytest.mark.slow
def test_the_report_draws_the_loss_scale_and_counts_the_skipped_steps(tmp_path):
    import base64

    from graddoctor.report import write_run_report
    from graddoctor.report._views import loss_figure

    _, oracle = _train(None, watch=False)
    _train(tmp_path / "amp")
    _train(tmp_path / "plain", pass_scaler=False, unscale_in_loop=True)
    figure = loss_figure(tmp_path / "amp")
    assert f"{int(oracle[:, 1].sum())} step(s) the GradScaler skipped" in figure.caption
    assert base64.b64decode(figure.data.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "AMP loss scale" not in loss_figure(tmp_path / "plain").caption
    html = write_run_report([tmp_path / "amp"], tmp_path / "report.html").read_text()
    assert "AMP loss scale" in html and "expected while it calibrates its scale" in html
