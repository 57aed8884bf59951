"""Converged is not stuck: an LSTM language model whose loss fell several-fold and flattened gets no
`loss_not_decreasing`, neither from live diagnosis (which judges a window of recent steps, with the run's
start level carried in) nor from the final diagnose; a model that does not learn (lr 0) still gets it.

Real training on synthetic text (a repeated 8-token pattern with 10% noise tokens). The oracle for
"converged" is the loop's own losses: the last 50 steps' median against the first 10 steps'.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _lm import LSTMLM, V, pattern_batch
from torch import nn

import graddoctor as gd
from graddoctor.diagnosis import DiagnoseConfig
from graddoctor.diagnosis._live import LiveDiagnosis

WINDOW = 100  # live window, short so that the start of a 200-step run leaves it (as 2000 steps do on long runs)


def _train(run_dir, seed, lr, steps=200, config=None):
    """Returns (losses, live findings, final findings, live findings with the converged test turned off)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LSTMLM(emb=16, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, run_dir, flush_every=20, live_diagnosis=False)
        live = LiveDiagnosis(run_dir, config=config, window=WINDOW)
        # the same windows judged with the converged test turned off (a fall no run reaches): the old rule
        blind = LiveDiagnosis(run_dir, config=DiagnoseConfig(converged_fall=1e9), window=WINDOW)
        w.add_flush_listener(live)
        w.add_flush_listener(blind)
        for _ in range(steps):
            x, y = pattern_batch(g, n=16, t=16)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
            losses.append(float(loss))
        w.close()
    return np.array(losses), live.findings, gd.diagnose(run_dir, config), blind.findings


def _codes(findings):
    return [f.code for f in findings]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_converged_lstm_lm_is_not_stuck_live_or_final(tmp_path, seed):
    losses, live, final, blind = _train(tmp_path / "run", seed, lr=2e-2)
    start, end = max(np.median(losses[:10]), np.log(V)), np.median(losses[-50:])
    assert end * DiagnoseConfig().converged_fall <= start, f"premise: converged ({start:.3g} -> {end:.3g})"
    assert "loss_not_decreasing" not in _codes(live)
    assert "loss_not_decreasing" not in _codes(final)
    if seed == 0:  # the test can fail: without the converged test, the window past the start warns
        assert "loss_not_decreasing" in _codes(blind)


@pytest.mark.slow
def test_a_model_that_does_not_learn_is_still_flagged_live_and_final(tmp_path):
    losses, live, final, _ = _train(tmp_path / "run", 0, lr=0.0, steps=120)
    assert np.median(losses[-20:]) > 0.9 * np.median(losses[:10]), "premise: nothing learned"
    assert "loss_not_decreasing" in _codes(live)
    assert "loss_not_decreasing" in _codes(final)
    # the live window (120 steps > WINDOW) and the whole run are judged against the same start level
    assert [f for f in final if f.code == "loss_not_decreasing"][0].evidence["start_loss_median"] == pytest.approx(
        [f for f in live if f.code == "loss_not_decreasing"][0].evidence["start_loss_median"], rel=5e-3)
