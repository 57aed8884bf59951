"""gd.doctor on broken runs, each with a healthy twin (issue 17's acceptance).

Each case: a broken training run and its twin, the same task trained the way it should be. The oracle for the
twin's final loss is an independent plain PyTorch loop (no watch, no doctor), whose tail median numpy computes.
The doctor's best trial must reach within 10% of it (loss <= 1.1 x the twin's; the tasks have a noise floor,
Gumbel-sampled labels, so a loss near the floor is what "trained" means) and must clear every critical
finding diagnose made on the broken baseline.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.doctor._ranking import cleared

pytestmark = pytest.mark.slow
STEPS = 100
CE = nn.functional.cross_entropy


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _teacher(n_in=16, n_out=4, n=8192):
    """Labels drawn from softmax(x W / 2) (Gumbel-max): a task whose loss has a floor (no memorizing)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n_in, generator=g)
    logits = x @ torch.randn(n_in, n_out, generator=g) / 2
    y = (logits - torch.log(-torch.log(torch.rand(n, n_out, generator=g)))).argmax(1)
    return x, y


def _fixed(x, y, n=STEPS, bs=64):
    g = torch.Generator().manual_seed(1)
    data = [(x[i], y[i]) for i in (torch.randint(0, len(x), (bs,), generator=g) for _ in range(n))]
    return lambda: iter(data)


def _mlp(depth, act, lr, init=None, bias=None, width=32):
    def build():
        sizes = [16] + [width] * (depth - 1) + [4]
        layers: list[nn.Module] = []
        for i in range(depth):
            lin = nn.Linear(sizes[i], sizes[i + 1])
            if init is not None:
                init(lin.weight)
            if bias is not None:
                nn.init.constant_(lin.bias, bias)
            layers += [lin] + ([act()] if i < depth - 1 else [])
        model = nn.Sequential(*layers)
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return build


class _Seq(nn.Module):
    """A ReLU RNN whose recurrent weight is `scale` x identity (IRNN; 1.0 explodes over 50 steps)."""

    def __init__(self, scale):
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.eye(32) * scale)
            self.rnn.bias_hh_l0.zero_()

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _rnn(scale):
    def build():
        model = _Seq(scale)
        return model, torch.optim.SGD(model.parameters(), lr=0.01)
    return build


def _seq_data():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(512, 50, 4, generator=g)
    return _fixed(x, x[:, :, 0].mean(1, keepdim=True) + 0.5 * x[:, -1, 1:2], bs=32)


class _TF(nn.Module):
    """Predicts the most frequent token of 8 (attention over the whole sequence); post-LN or pre-LN."""

    def __init__(self, norm_first):
        super().__init__()
        self.emb, self.pos = nn.Embedding(8, 32), nn.Parameter(torch.zeros(8, 32))
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(32, 8)

    def forward(self, tok):
        return self.head(self.enc(self.emb(tok) + self.pos).mean(1))


def _tf(norm_first):
    def build():
        model = _TF(norm_first)
        return model, torch.optim.Adam(model.parameters(), lr=0.03)
    return build


def _tokens():
    g = torch.Generator().manual_seed(4)
    tok = torch.randint(0, 8, (4096, 8), generator=g)
    return _fixed(tok, torch.mode(tok, dim=1).values)


HE = lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu")  # noqa: E731
DATA = _fixed(*_teacher())
MSE = nn.functional.mse_loss
# name: (broken build, healthy twin build, batches, loss, max_trials)
CASES = {
    "deep_sigmoid_mlp": (_mlp(10, nn.Sigmoid, 0.1), _mlp(10, nn.ReLU, 0.1, HE), DATA, CE, 8),
    "deep_relu_xavier": (_mlp(20, nn.ReLU, 0.05, nn.init.xavier_normal_, 0.0), _mlp(20, nn.ReLU, 0.05, HE, 0.0),
                         DATA, CE, 4),
    "tanh_large_init": (_mlp(6, nn.Tanh, 0.01, lambda w: nn.init.normal_(w, 0, 1.0)), _mlp(6, nn.Tanh, 0.01), DATA,
                        CE, 8),
    "exploding_rnn": (_rnn(1.0), _rnn(0.5), _seq_data(), MSE, 4),
    "lr_divergence": (_mlp(4, nn.ReLU, 5.0, HE, 0.0), _mlp(4, nn.ReLU, 0.5, HE, 0.0), DATA, CE, 4),
    "dead_relus": (_mlp(5, nn.ReLU, 0.05, HE, -4.0), _mlp(5, nn.ReLU, 0.05, HE, 0.0), DATA, CE, 4),
    "post_ln_transformer": (_tf(False), _tf(True), _tokens(), CE, 3),
}


def _plain_final_loss(build, batches, loss_fn, steps=STEPS):
    """The oracle: a plain PyTorch loop, then numpy's median of the last 10% of the losses."""
    torch.manual_seed(0)
    model, opt = build()
    losses, it = [], batches()
    for _ in range(steps):
        x, y = next(it)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.median(losses[-max(1, round(0.1 * steps)):]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_best_prescription_reaches_the_healthy_twin_and_clears_the_critical_finding(name, tmp_path):
    broken, twin, batches, loss_fn, max_trials = CASES[name]
    rx = gd.doctor(broken, batches, loss_fn, steps=STEPS, out=tmp_path, workers=1, max_trials=max_trials)
    target = _plain_final_loss(twin, batches, loss_fn)
    assert not rx.healthy and rx.baseline.findings, f"{name}: the broken run was not diagnosed"
    assert rx.prescribed, gd.format_prescription(rx)
    assert rx.best.final_loss <= 1.1 * target, f"{name}: best {rx.best.final_loss} vs twin {target}\n" \
                                               + gd.format_prescription(rx)
    assert cleared(rx.best, rx.baseline) and not set(rx.best.critical) & set(rx.baseline.critical)
    # the trial's own numbers: its final loss is the tail median of the losses it recorded
    assert math.isclose(rx.best.final_loss, float(np.median(rx.best.losses[-10:])), rel_tol=1e-12)
    assert rx.trials[0] is rx.best and len(rx.trials) <= max_trials + 1 + 0


def test_on_a_healthy_run_the_doctor_prescribes_nothing(tmp_path):
    rx = gd.doctor(_mlp(10, nn.ReLU, 0.1, HE), DATA, CE, steps=STEPS, out=tmp_path, workers=1)
    assert rx.healthy and not rx.prescribed and rx.best is rx.baseline and rx.trials == [rx.baseline]
    assert rx.baseline.final_loss == pytest.approx(_plain_final_loss(_mlp(10, nn.ReLU, 0.1, HE), DATA, CE),
                                                   rel=1e-5)
    assert "nothing prescribed" in gd.format_prescription(rx)


def test_trials_in_parallel_processes_give_what_one_process_gives(tmp_path):
    """workers=2 forks the trials into processes; each trial seeds itself and trains on the same batches, so
    every trial's losses equal the one-process run's (same remedies, same order after ranking)."""
    broken, _, batches, loss_fn, _ = CASES["lr_divergence"]
    one = gd.doctor(broken, batches, loss_fn, steps=40, out=tmp_path / "one", workers=1, max_trials=3,
                    progress=False)
    two = gd.doctor(broken, batches, loss_fn, steps=40, out=tmp_path / "two", workers=2, max_trials=3,
                    progress=False)
    assert [t.remedy for t in one.trials] == [t.remedy for t in two.trials]
    for a, b in zip(one.trials, two.trials):
        np.testing.assert_array_equal(np.asarray(a.losses), np.asarray(b.losses), err_msg=a.remedy)
