"""The hidden state is not the input: watch reads the batch from the model's first argument only, and a
recurrent state that goes non-finite is blamed on the recurrence, never on the data."""
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.core._activations import first_tensor


def test_first_tensor_is_the_first_argument_only():
    x, h, ids = torch.randn(2, 3), torch.full((1, 2, 4), math.nan), torch.zeros(2, 3, dtype=torch.long)
    assert first_tensor((x, h), {}) is x
    assert first_tensor((ids, h), {}) is None  # token indices: no float statistics, and never the hidden state
    assert first_tensor((), {"input_ids": ids, "hidden": h}) is None
    assert first_tensor((), {"x": x, "hidden": h}) is x
    assert first_tensor(([x], h), {}) is None


class ReluLM(nn.Module):
    """A ReLU RNN language model called as model(ids, hidden); a recurrent init `gain` times the usual."""

    def __init__(self, gain, V=32, E=16, H=32, float_input=False):
        super().__init__()
        self.emb = nn.Linear(V, E) if float_input else nn.Embedding(V, E)
        self.rnn = nn.RNN(E, H, nonlinearity="relu", batch_first=True)
        self.out = nn.Linear(H, V)
        with torch.no_grad():
            self.rnn.weight_hh_l0.normal_(0.0, gain / math.sqrt(H))

    def forward(self, x, hidden):
        y, h = self.rnn(self.emb(x), hidden)
        return self.out(y), h


def train_lm(run_dir, gain, float_input=False, nan_batch_at=None, steps=20, V=32, T=20, B=8):
    torch.manual_seed(0)
    model = ReluLM(gain, V=V, float_input=float_input)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = torch.randint(0, V, (B, steps * T + 1))
    hidden = torch.zeros(1, B, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, run_dir, flush_every=10, live_diagnosis=False)
        for s in range(steps):
            chunk = tokens[:, s * T:(s + 1) * T + 1]
            x = nn.functional.one_hot(chunk[:, :-1], V).float() if float_input else chunk[:, :-1]
            if s == nan_batch_at:
                x = x.clone()
                x[0, 0, 0] = math.nan
            logits, hidden = model(x, hidden)
            hidden = hidden.detach()  # truncated BPTT: the state is carried, the graph is not
            loss = nn.functional.cross_entropy(logits.reshape(-1, V), chunk[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
        w.close()
    return {f.code: f for f in gd.diagnose(run_dir)}, hidden


@pytest.mark.slow
@pytest.mark.parametrize("float_input", [False, True])
def test_exploding_hidden_state_is_recurrence_not_data(tmp_path, float_input):
    found, hidden = train_lm(tmp_path / "run", gain=3.0, float_input=float_input)
    assert not torch.isfinite(hidden).all()  # the carried state really went non-finite
    steps, inputs = gd.open_run(tmp_path / "run").inputs()
    if float_input:  # one row per batch, and the batches were finite: no NaN recorded
        assert len(steps) == 20 and np.isfinite(inputs).all() and (inputs[:, 1] == 0).all()
    else:  # token indices give no row: the hidden state is never read in their place
        assert len(steps) == 0
    assert "input_outlier" not in found
    assert found["nonfinite_gradient"].cause == "recurrence"
    assert found["nonfinite_gradient"].evidence["first_nonfinite"] != "input"


@pytest.mark.slow
def test_a_real_nan_batch_is_still_data(tmp_path):
    found, _ = train_lm(tmp_path / "run", gain=0.5, float_input=True, nan_batch_at=12)
    steps, inputs = gd.open_run(tmp_path / "run").inputs()
    assert steps[inputs[:, 1] > 0].tolist() == [12] and inputs[12, 1] == 1
    assert found["input_outlier"].cause == "data"
    assert found["nonfinite_gradient"].cause == "data"
    assert found["nonfinite_gradient"].evidence["first_nonfinite"] == "input"


def test_calm_nan_in_recurrent_state_is_recurrence(tmp_path):
    """A NaN that enters the carried state with no rise before it (here: written into the state, as a
    buggy state update would) is found in the recurrent layer's sampled output: cause recurrence."""
    torch.manual_seed(0)
    model = ReluLM(gain=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    hidden = torch.zeros(1, 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, tmp_path / "run", activation_every=2, live_diagnosis=False)
        for s in range(8):
            if s == 5:
                hidden[0, 0, 0] = math.nan
            ids = torch.randint(0, 32, (4, 11))
            logits, hidden = model(ids[:, :-1], hidden)
            hidden = hidden.detach()
            loss = nn.functional.cross_entropy(logits.reshape(-1, 32), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
        w.close()
    f = {f.code: f for f in gd.diagnose(tmp_path / "run")}["nonfinite_gradient"]
    assert f.first_step == 5 and f.cause == "recurrence"
    assert "rnn's output held NaN/Inf" in f.evidence["reasoning"]
