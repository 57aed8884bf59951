"""Vanishing through time: watch's time_grad row against a float64 autograd oracle, and diagnose's finding
on a vanilla tanh RNN that must remember the first of 50 tokens (an LSTM on the same task: no finding)."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.store._series import TIME_FIELDS

K = 8  # positions in a row: lags round(T^(k/7)) - 1 from the last step (k = 0) to the first (k = 7)


def lags(T):
    return [round(T ** (k / (K - 1))) - 1 for k in range(K)]


def stepwise_state_grads(module, x, loss_of_last, batch_first):
    """float64 oracle: the module run one step per call (no chunks), the gradient of the loss (a function of the
    last output) w.r.t. each step's carried state; the last position's is the gradient at the last output."""
    m64 = type(module)(module.input_size, module.hidden_size, batch_first=True).double()
    m64.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    xb = (x if batch_first else x.transpose(0, 1)).double()
    T = xb.shape[1]
    h, states = None, []
    for t in range(T):
        y, h = m64(xb[:, t:t + 1], h)
        states.append(h if isinstance(h, tuple) else (h,))
    last = y[:, 0]
    flat = [s for st in states[:-1] for s in st]
    grads = torch.autograd.grad(loss_of_last(last), flat + [last])
    per = len(states[0])
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in grads[t * per:(t + 1) * per])) for t in range(T - 1)]
    return norms + [float(grads[-1].norm())]


@pytest.mark.parametrize("cls, batch_first", [(nn.RNN, True), (nn.LSTM, False), (nn.GRU, True)])
def test_time_row_matches_float64_oracle(tmp_path, cls, batch_first):
    torch.manual_seed(0)
    T, B, F, H = 40, 4, 3, 8
    rnn, head = cls(F, H, batch_first=batch_first), nn.Linear(H, 2)
    model = nn.ModuleDict({"rnn": rnn, "head": head})
    x = torch.randn((B, T, F) if batch_first else (T, B, F))
    target = torch.randint(0, 2, (B,))

    def loss_of_last(last):
        return nn.functional.cross_entropy(head.to(last.dtype)(last), target)

    w = gd.watch(model, None, tmp_path / "run", activation_every=1, live_diagnosis=False)
    y, _ = rnn(x)
    loss = loss_of_last(y[:, -1] if batch_first else y[-1])
    loss.backward()
    w.step(loss)
    w.close()
    steps, rows = gd.open_run(tmp_path / "run").series("time_grad")
    assert steps.tolist() == [0] and rows.shape == (1, len(TIME_FIELDS))
    head.float()
    oracle = stepwise_state_grads(rnn, x, loss_of_last, batch_first)
    want = [oracle[T - 1 - lag] for lag in lags(T)]
    assert rows[0, 0] == 0 and rows[0, 1] == T
    # float32 carries T Jacobian-vector products, each rounding to ~H * eps32 relative: 40 * 8 * 6e-8 = 2e-5;
    # 1e-4 leaves room for the float32 norm.
    np.testing.assert_allclose(rows[0, 2:], want, rtol=1e-4)


class FirstToken(nn.Module):
    """Classify a sequence of tokens by its first token: only the last step has a loss."""

    def __init__(self, cell, V=4, E=8, H=32):
        super().__init__()
        self.emb, self.rnn, self.out = nn.Embedding(V, E), cell(E, H, batch_first=True), nn.Linear(H, V)
        if cell is nn.LSTM:  # the forget gate starts open (bias 1: Gers et al. 2000, Jozefowicz et al. 2015)
            with torch.no_grad():
                self.rnn.bias_ih_l0[H:2 * H] = 1.0
                self.rnn.bias_hh_l0[H:2 * H] = 0.0

    def forward(self, ids):
        y, _ = self.rnn(self.emb(ids))
        return self.out(y[:, -1])


def oracle_ratio(model, ids):
    """float64: |dL/dh_1| / |dL/dh_T| of a tanh RNN unrolled by hand (the loss is on the last step only)."""
    r = model.rnn
    W_ih, W_hh, b = (r.weight_ih_l0.double(), r.weight_hh_l0.double(), (r.bias_ih_l0 + r.bias_hh_l0).double())
    e = model.emb.weight.double()[ids]
    h, hs = torch.zeros(ids.shape[0], r.hidden_size, dtype=torch.float64), []
    for t in range(ids.shape[1]):
        h = torch.tanh(e[:, t] @ W_ih.T + h @ W_hh.T + b)
        hs.append(h)
    logits = hs[-1] @ model.out.weight.double().T + model.out.bias.double()
    g = torch.autograd.grad(nn.functional.cross_entropy(logits, ids[:, 0]), [hs[0], hs[-1]])
    return float(g[0].norm() / g[1].norm())


def train_first_token(tmp_path, cell, seed, T=50, steps=30, every=5):
    torch.manual_seed(seed)
    model = FirstToken(cell)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sampled = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, tmp_path / f"{cell.__name__}{seed}", activation_every=every, live_diagnosis=False)
        for s in range(steps):
            ids = torch.randint(0, 4, (16, T))
            if s % every == 0:
                sampled.append((ids, {k: v.clone() for k, v in model.state_dict().items()}))
            loss = nn.functional.cross_entropy(model(ids), ids[:, 0])
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
        w.close()
    return gd.diagnose(tmp_path / f"{cell.__name__}{seed}"), sampled


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vanilla_rnn_vanishes_through_time_and_lstm_does_not(tmp_path, seed):
    found, sampled = train_first_token(tmp_path, nn.RNN, seed)
    v = {f.code: f for f in found}["vanishing_gradient"]
    assert v.cause == "recurrence" and "through_time" in v.evidence["forms"]
    assert v.remedies[0].id in ("rnn_to_lstm", "rnn_to_gru")
    oracle = []
    for ids, state in sampled:
        m = FirstToken(nn.RNN)
        m.load_state_dict(state)
        oracle.append(oracle_ratio(m, ids))
    assert max(oracle) <= 1e-7  # every sample vanished, so the evidence's median is over all of them
    # 3 significant digits in the evidence (5e-3) and float32's chain of 50 products (~1e-5).
    assert v.evidence["through_time_ratio"] == pytest.approx(float(np.median(oracle)), rel=6e-3)
    lstm, _ = train_first_token(tmp_path, nn.LSTM, seed)
    assert "vanishing_gradient" not in {f.code for f in lstm}
