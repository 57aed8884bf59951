"""A GradScaler that was not passed to watch: diagnose recognises its signature (gradients a power of two
too large from step 0, overflow steps skipped with a zero update) and says "pass scaler= to watch", with no
architecture change; with the scaler passed there is no such finding.

Every run is real float16 autocast training on the CPU through a real `torch.amp.GradScaler`; the oracle
for the scale and the skipped steps is the scaler's own `get_scale()` read in the loop.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import graddoctor as gd

SIGNATURE = "amp_scaler_not_passed"


def _scaled_step(w, scaler, opt, loss) -> bool:
    """One step of the user's GradScaler loop; True when the scaler skipped it (the oracle: the scaler halves
    its scale after an overflow it skipped)."""
    opt.zero_grad()
    scaler.scale(loss).backward()
    w.step(loss)
    taken = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    return scaler.get_scale() < taken


def _train(run_dir, *, pass_scaler, init_scale, steps=30):
    """Train a small MLP under fp16 autocast and a GradScaler; returns (skipped steps, the scale of step 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, run_dir, flush_every=10, sample_every=1, scaler=scaler if pass_scaler else None)
        skipped = []
        for i in range(steps):
            with torch.autocast("cpu", dtype=torch.float16):
                out = model(x)
            if _scaled_step(w, scaler, opt, nn.functional.cross_entropy(out.float(), y)):
                skipped.append(i)
        w.close()
    return skipped, scaler


def _amp_findings(findings):
    return [f for f in findings if f.evidence.get("signature") == SIGNATURE]


@pytest.mark.parametrize("init_scale", [2.0 ** 16, 2.0 ** 24])
def test_unpassed_scaler_is_recognised_and_the_remedy_is_to_pass_it(tmp_path, init_scale):
    skipped, scaler = _train(tmp_path / "run", pass_scaler=False, init_scale=init_scale)
    findings = gd.diagnose(tmp_path / "run")
    amp = _amp_findings(findings)
    assert len(amp) == 1, [(f.code, f.message) for f in findings]
    f = amp[0]
    assert [r.id for r in f.remedies] == ["pass_scaler"] and "scaler=scaler" in f.remedies[0].snippet
    assert f.severity != "critical" and "pass scaler= to watch" in f.message
    # the skipped steps are the scaler's own (oracle: its scale halved after them)
    assert f.evidence["skipped_steps"] == skipped
    # The SGD step implies the scale the optimizer divided out: the scaler's scale after calibration
    # (the first sampled finite step is the first step the scaler did not skip).
    first_taken = init_scale / 2 ** len(skipped)
    assert f.evidence["implied_scale_log2"] == round(math.log2(first_taken))
    # no critical explosion, no non-finite alarm, nothing about depth or architecture
    assert not any(g.severity == "critical" for g in findings)
    assert not any(g.code in ("exploding_gradient", "nonfinite_gradient") and g is not f for g in findings)
    assert not any(g.cause == "depth" for g in findings)


def test_with_the_scaler_passed_there_is_no_such_finding(tmp_path):
    skipped, _ = _train(tmp_path / "run", pass_scaler=True, init_scale=2.0 ** 24)
    assert skipped, "premise: the scale calibrates by overflowing"
    findings = gd.diagnose(tmp_path / "run")
    assert not _amp_findings(findings)
    assert not any(f.code == "exploding_gradient" for f in findings)


def test_a_real_explosion_without_amp_is_not_taken_for_a_scaler(tmp_path):
    """A ReLU MLP at a huge learning rate blows up for real: its gradients were not large at
    step 0 and the weights went non-finite, so the AMP signature must not claim it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, tmp_path / "run", flush_every=10) as w:
            for _ in range(30):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    assert not torch.isfinite(next(model.parameters())).all(), "premise: the run blew up"
    findings = gd.diagnose(tmp_path / "run")
    assert findings and not _amp_findings(findings)


def _train_adam(run_dir, *, pass_scaler, lr=1e-3, use_scaler=True, steps=40):
    """A small MLP trained by Adam, its loss scaled by a GradScaler (2^16, which never overflows here) or not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=use_scaler)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    skipped = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, run_dir, flush_every=10, scaler=scaler if pass_scaler else None) as w:
            for _ in range(steps):
                skipped += _scaled_step(w, scaler, opt, nn.functional.cross_entropy(model(x), y))
    return skipped


def test_adam_trained_through_unpassed_scaled_gradients_is_recognised(tmp_path):
    """Adam divides by the gradients' own RMS, so a constant scale changes nothing and no step overflows or
    shows the scale in its size: the signature is gradients far too large from step 0 under which Adam
    trained normally."""
    assert _train_adam(tmp_path / "unpassed", pass_scaler=False) == 0, "premise: no overflow, nothing skipped"
    findings = gd.diagnose(tmp_path / "unpassed")
    amp = _amp_findings(findings)
    assert len(amp) == 1 and amp[0].cause == "mixed_precision", [(f.code, f.cause) for f in findings]
    assert [r.id for r in amp[0].remedies] == ["pass_scaler"]
    assert not any(f.severity == "critical" for f in findings)
    # the same run with the scaler passed, and the same model without any scaling: no such finding
    _train_adam(tmp_path / "passed", pass_scaler=True)
    _train_adam(tmp_path / "plain", pass_scaler=False, use_scaler=False)
    for name in ("passed", "plain"):
        assert not _amp_findings(gd.diagnose(tmp_path / name)), name


def test_a_recurrent_explosion_under_adam_is_not_taken_for_a_scaler(tmp_path):
    """A tanh RNN with recurrent weights of spectral radius 4 explodes through time from step 0 and Adam,
    which divides by the gradients' own scale, trains through it: the same two facts as an unpassed scaler
    under Adam. But a loss scale multiplies every gradient alike; this explosion leaves the head's gradient
    at its usual scale, so it is not the AMP signature."""
    from graddoctor.diagnosis._config import DiagnoseConfig
    from graddoctor.diagnosis._data import RunData
    from graddoctor.diagnosis._rules_amp import _early_ratio, trained_through_it

    torch.manual_seed(0)
    rnn, head = nn.RNN(8, 32, batch_first=True), nn.Linear(32, 4)
    with torch.no_grad():
        w = torch.randn(32, 32)
        rnn.weight_hh_l0.copy_(4 * w / torch.linalg.eigvals(w).abs().max())
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 40, 8), torch.randint(0, 4, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, tmp_path, flush_every=10) as w:
            for _ in range(40):
                loss = nn.functional.cross_entropy(head(rnn(x)[0][:, -1]), y)
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    with gd.open_run(tmp_path) as run:
        d = RunData.from_run(run)
    cfg = DiagnoseConfig()
    assert _early_ratio(d, cfg) > cfg.amp_grad_ratio and trained_through_it(d), "premise: the two shared facts"
    assert not _amp_findings(gd.diagnose(tmp_path))
