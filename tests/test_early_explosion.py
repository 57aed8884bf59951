"""Explosions in the first steps: a loss that jumps to many times its start within a few steps is a
`loss_spike` (the early-explosion evidence), judged against the step-0 loss and, for a language model,
ln(vocab); and vanishing is never the headline while the gradient norm rises by orders of magnitude.

Real runs: an LSTM language model trained with plain SGD at a huge learning rate, and the same model at
a sane one. The oracles are the losses the loop itself saw and ln(vocab) computed here.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from _lm import LSTMLM, V, pattern_batch
from torch import nn

import graddoctor as gd
from graddoctor.diagnosis import DiagnoseConfig


def _train(run_dir, seed, lr, steps=40):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LSTMLM(emb=32, hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    live, losses = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, run_dir, flush_every=20, on_finding=live.append) as w:
            for _ in range(steps):
                x, y = pattern_batch(g, n=32, t=24)
                loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
                losses.append(float(loss))
    return np.array(losses), live


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_lstm_lm_at_a_huge_lr_explodes_in_the_first_steps_and_is_not_called_vanishing(tmp_path, seed):
    losses, live = _train(tmp_path / "run", seed, lr=100.0)
    cfg = DiagnoseConfig()
    start = max(losses[0], math.log(V))
    early = np.flatnonzero(losses[:cfg.spike_min_history] >= cfg.early_lm_spike_factor * start)  # an LM: ln(V) known
    assert len(early), f"premise: the loss exploded early ({losses[:6]})"
    findings = gd.diagnose(tmp_path / "run")
    codes = [f.code for f in findings]
    spike = findings[codes.index("loss_spike")]
    ev = spike.evidence["early_explosion"]
    assert ev["uniform_loss_ln_vocab"] == pytest.approx(math.log(V), rel=5e-3)  # evidence keeps 3 significant digits
    assert ev["start_level"] == pytest.approx(start, rel=5e-3)  # evidence keeps 3 significant digits
    listed = spike.evidence["spike_steps"]  # the evidence lists the first 20 spike steps
    assert spike.first_step == early[0] and listed[:len(early)] == list(early)[:len(listed)]
    assert spike.cause == "learning_rate"  # the updates were huge before the loss exploded
    assert "vanishing_gradient" not in codes
    assert not any(f.code == "vanishing_gradient" for f in live), "not even live"
    assert any(f.code == "loss_spike" for f in live)


@pytest.mark.slow
def test_a_sane_lr_gets_no_early_explosion(tmp_path):
    losses, live = _train(tmp_path / "run", 0, lr=1.0)
    assert losses.max() < 2 * math.log(V), "premise: no explosion"
    findings = gd.diagnose(tmp_path / "run")
    assert not any(f.code in ("loss_spike", "vanishing_gradient", "exploding_gradient") for f in findings + live)
