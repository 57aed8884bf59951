"""Init schemes against their formulas (gains from torch.nn.init.calculate_gain), LSUV unit variance."""
from __future__ import annotations

import math

import pytest
import torch
from _numerics import orthogonality_bound
from torch import nn

import graddoctor as gd
from graddoctor.treat.init import NoLayersError


def net(width=400):
    return nn.Sequential(nn.Linear(300, width), nn.Tanh(), nn.Dropout(0.0), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.Sigmoid(),
                         nn.Linear(width, 10))


# tanh, relu, leaky 0.2, sigmoid, linear
EXPECTED_GAINS = [5 / 3, math.sqrt(2), math.sqrt(2 / (1 + 0.2 ** 2)), 1.0, 1.0]


def sd_tol(lin) -> float:
    """4 standard errors of a sample std (relative SE ~ 1/sqrt(2n)): a statistical margin (two-sided 6e-5)."""
    return 4 / math.sqrt(2 * lin.weight.numel())


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_he_gain_follows_next_activation():
    torch.manual_seed(0)
    model = net()
    done = gd.init.he_(model)
    assert len(done) == 5 and "tanh" in done[0] and "linear" in done[4]
    for lin, gain in zip(linears(model), EXPECTED_GAINS):
        expected = gain / math.sqrt(lin.in_features)
        assert float(lin.weight.detach().std()) == pytest.approx(expected, rel=sd_tol(lin))
        assert torch.count_nonzero(lin.bias) == 0


def test_he_fan_out_and_forced_nonlinearity():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(200, 600), nn.Sigmoid(), nn.Linear(600, 300))
    gd.init.he_(model, mode="fan_out", nonlinearity="relu")
    for lin in linears(model):
        expected = math.sqrt(2) / math.sqrt(lin.out_features)
        assert float(lin.weight.detach().std()) == pytest.approx(expected, rel=sd_tol(lin))
    with pytest.raises(ValueError):
        gd.init.he_(model, nonlinearity="nonsense")


def test_xavier_formula():
    torch.manual_seed(2)
    model = net()
    gd.init.xavier_(model)
    for lin, gain in zip(linears(model), EXPECTED_GAINS):
        expected = gain * math.sqrt(2.0 / (lin.in_features + lin.out_features))
        assert float(lin.weight.detach().std()) == pytest.approx(expected, rel=sd_tol(lin))


def test_orthogonal_linear_and_recurrent():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 8))
    rnn = nn.LSTM(5, 6)
    gd.init.orthogonal_(model)
    gd.init.orthogonal_(rnn)
    # tolerances: Householder QR's orthogonality in float32 and the product's rounding (_numerics.orthogonality_bound)
    w = linears(model)[0].weight
    torch.testing.assert_close(w @ w.T, (5 / 3) ** 2 * torch.eye(20), atol=orthogonality_bound(20, 20, 5 / 3), rtol=0)
    w = linears(model)[1].weight  # 8x20: orthonormal rows, gain 1
    torch.testing.assert_close(w @ w.T, torch.eye(8), atol=orthogonality_bound(20, 8), rtol=0)
    for block in rnn.weight_hh_l0.split(6):  # one orthogonal block per gate
        torch.testing.assert_close(block @ block.T, torch.eye(6), atol=orthogonality_bound(6, 6), rtol=0)
    assert torch.count_nonzero(rnn.bias_hh_l0) == 0


def test_lsuv_gives_unit_output_variance_within_tol():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 128),
                          nn.Sigmoid(), nn.Linear(128, 10))
    x = torch.randn(512, 64) * 7 + 3  # badly scaled inputs
    done = gd.init.lsuv_(model, x, tol=0.1, max_iter=10)
    assert len(done) == 4
    outs = []
    hooks = [lin.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for lin in linears(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for o in outs:  # measured independently of the code under test
        assert abs(float(o.var()) - 1.0) <= 0.1  # LSUV's own tol=0.1: it rescales until the batch variance is within it


def test_lsuv_respects_max_iter():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10))
    x = torch.randn(256, 10) * 50
    done = gd.init.lsuv_(model, x, max_iter=0)
    assert all("after 0 rescaling" in d for d in done)
    assert float(done[0].split("variance=")[1].split()[0]) > 10  # nothing was rescaled


def test_zero_residual_makes_blocks_identity():
    model, _ = gd.surgery.add_residual(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(),
                                                     nn.Linear(4, 2)))
    gd.init.he_(model)  # branches are random now
    h = torch.randn(3, 4)
    block = model[0]
    assert not torch.equal(block(h), h)
    done = gd.init.zero_residual_(model)
    assert len(done) == 2 and torch.equal(block(h), h)
    with pytest.raises(NoLayersError, match="no residual branch"):
        gd.init.zero_residual_(nn.Sequential(nn.Linear(2, 2)))


def test_no_layers_error():
    with pytest.raises(NoLayersError):
        gd.init.he_(nn.Sequential(nn.ReLU()))


def test_lsuv_on_a_transformer_encoder_scales_the_layers_it_reaches_and_names_the_ones_it_cannot():
    """nn.TransformerEncoder: MultiheadAttention applies out_proj's weight as a function, so no hook sees its
    output (it is left orthonormal, and said so); linear1/linear2 reach unit output variance on the batch
    (oracle: their outputs captured by the test's own hooks, variance in float64)."""
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    x = torch.randn(64, 8, 16)
    lines = gd.init.lsuv_(model, x, tol=0.1)
    assert sum("out_proj: lsuv skipped" in line for line in lines) == 2
    outs = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o.detach().double()))
             for n, m in model.named_modules() if n.endswith(("linear1", "linear2"))]
    model(x)  # grad enabled: the layers' Python forward, not the fused path
    for h in hooks:
        h.remove()
    assert len(outs) == 4
    for name, out in outs.items():
        assert abs(float(out.var()) - 1.0) <= 0.1 + 1e-3, name  # lsuv's tol, plus float32 vs float64 variance
