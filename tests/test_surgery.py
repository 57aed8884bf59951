"""Model surgery: output shapes kept, gradient flow through a 12-layer sigmoid MLP restored (measured)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.lab._demo import make_mlp, synthetic_task
from graddoctor.treat.surgery import Residual, SurgeryNotApplicableError


def first_last_ratio(model: nn.Module, x, y) -> float:
    """|grad| of the first Linear weight over that of the last, on one batch."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return float(lin[0].weight.grad.norm() / lin[-1].weight.grad.norm())


@pytest.fixture(scope="module")
def sigmoid12():
    torch.manual_seed(0)
    x, y = synthetic_task(256)
    model = make_mlp(12, 32, nn.Sigmoid, "default")
    return model, x, y, first_last_ratio(model, x, y)


SURGERIES = {
    "swap_activation": lambda m, x: gd.surgery.swap_activation(m, nn.Sigmoid, nn.ReLU)[0],
    "add_norm_batch": lambda m, x: gd.surgery.add_norm(m, kind="batch")[0],
    "add_norm_layer": lambda m, x: gd.surgery.add_norm(m, kind="layer")[0],
    "add_residual": lambda m, x: gd.surgery.add_residual(m)[0],
    "he_": lambda m, x: (gd.init.he_(m), m)[1],
    "lsuv_": lambda m, x: (gd.init.lsuv_(m, x), m)[1],
}


# How much each cure raises the first/last gradient ratio, at least. Measured over fixture seeds 0-4:
# he_ 63x-724x (He scaling alone leaves the sigmoid's derivative <= 0.25 in every layer), LayerNorm and
# LSUV >= 1.9e4x, ReLU >= 4.9e5x, BatchNorm and residual >= 1.6e8x; before, the ratio is <= 1.1e-9.
MIN_GAIN = {"he_": 10.0}
DEFAULT_MIN_GAIN = 1000.0


@pytest.mark.parametrize("name", sorted(SURGERIES))
def test_cure_raises_first_last_gradient_ratio(sigmoid12, name):
    base, x, y, before = sigmoid12
    assert before < 1e-6  # the disease is there: the first layer barely gets a gradient
    model = SURGERIES[name](copy.deepcopy(base), x)
    assert model(x).shape == base(x).shape
    after = first_last_ratio(model, x, y)
    assert after >= MIN_GAIN.get(name, DEFAULT_MIN_GAIN) * before, f"{name}: ratio {before:.3g} -> {after:.3g}"


def test_swap_activation_factories_and_changes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), nn.Linear(4, 1))
    model, changes = gd.surgery.swap_activation(model, (nn.Tanh, nn.Sigmoid), lambda: nn.LeakyReLU(0.1))
    assert changes == ["1: Tanh -> LeakyReLU", "2.1: Sigmoid -> LeakyReLU"]
    assert isinstance(model[2][1], nn.LeakyReLU) and model[2][1].negative_slope == 0.1
    assert model[1] is not model[2][1]
    with pytest.raises(SurgeryNotApplicableError, match="no Tanh"):
        gd.surgery.swap_activation(model, nn.Tanh, nn.ReLU)


def test_add_norm_conv_and_nested_shapes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Sequential(nn.Linear(8 * 36, 16), nn.Tanh()), nn.Linear(16, 2))
    x = torch.randn(5, 3, 6, 6)
    shape = model(x).shape
    for kind, cls in (("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm)):
        new, changes = gd.surgery.add_norm(copy.deepcopy(model), kind=kind)
        assert new(x).shape == shape
        assert len(changes) == 3 and sum(isinstance(m, cls) for m in new.modules()) == 2
    with pytest.raises(SurgeryNotApplicableError):
        gd.surgery.add_norm(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(SurgeryNotApplicableError, match="kind="):
        gd.surgery.add_norm(model, kind="group")


@pytest.mark.parametrize("mode", ["zero", "rezero"])
def test_add_residual_starts_as_identity_blocks(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    x = torch.randn(7, 5)
    new, changes = gd.surgery.add_residual(copy.deepcopy(model), mode=mode)
    blocks = [m for m in new.modules() if isinstance(m, Residual)]
    assert len(blocks) == len(changes) == 2
    for b in blocks:  # each block is the identity at the start
        h = torch.randn(4, 8)
        assert torch.equal(b(h), h)
    assert new(x).shape == model(x).shape
    with pytest.raises(SurgeryNotApplicableError, match="shape-preserving"):
        gd.surgery.add_residual(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4)))


def test_add_residual_conv_same_padding():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1))
    new, changes = gd.surgery.add_residual(model)
    assert len(changes) == 2  # the strided conv changes the shape and is left alone
    assert new(torch.randn(2, 4, 8, 8)).shape == (2, 4, 4, 4)


class RNNNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.rnn = nn.RNN(3, 6, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, h = self.rnn(x)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1]) + h[-1].sum() * 0


@pytest.mark.parametrize("surgery,cls", [(gd.surgery.rnn_to_lstm, nn.LSTM), (gd.surgery.rnn_to_gru, nn.GRU)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_rnn_to_gated_keeps_sizes_and_interface(surgery, cls, batch_first):
    model = RNNNet(batch_first)
    x = torch.randn(4, 9, 3) if batch_first else torch.randn(9, 4, 3)
    shape = model(x).shape
    new, changes = surgery(model)
    assert isinstance(new.rnn, cls) and len(changes) == 1
    assert (new.rnn.input_size, new.rnn.hidden_size, new.rnn.num_layers, new.rnn.batch_first) == (3, 6, 2, batch_first)
    assert new(x).shape == shape
    with pytest.raises(SurgeryNotApplicableError, match="no nn.RNN"):
        surgery(new)


def test_rnn_to_lstm_plain_interface_and_gru_alias():
    new, _ = gd.surgery.rnn_to_lstm(nn.RNN(2, 3), keep_interface=False)
    assert type(new) is nn.LSTM
    out, (h, c) = new(torch.randn(5, 1, 2))
    assert out.shape == (5, 1, 3) and c.shape == (1, 1, 3)
    new, _ = gd.surgery.rnn_to_lstm(nn.Sequential(nn.RNN(2, 3)), cell="gru")
    assert isinstance(new[0], nn.GRU)


def test_lstm_as_rnn_takes_an_rnn_hidden_state():
    lstm, _ = gd.surgery.rnn_to_lstm(nn.RNN(3, 5, num_layers=2, batch_first=True))
    x, h0 = torch.randn(4, 7, 3), torch.randn(2, 4, 5)
    out, h = lstm(x, h0)
    plain = nn.LSTM(3, 5, num_layers=2, batch_first=True)
    plain.load_state_dict(lstm.state_dict())
    ref_out, (ref_h, _) = plain(x, (h0, torch.zeros(2, 4, 5)))  # the cell state starts at zero
    assert torch.equal(out, ref_out) and torch.equal(h, ref_h)


def test_rnn_to_lstm_opens_the_forget_gates():
    """Each layer's forget gate starts at sigmoid(1) ~ 0.73 instead of ~0.5 (its two biases sum to 1), and
    the other gates keep PyTorch's init."""
    torch.manual_seed(0)
    lstm, _ = gd.surgery.rnn_to_lstm(nn.RNN(3, 5, num_layers=2))
    h = lstm.hidden_size
    for layer in range(2):
        b_ih, b_hh = getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}")
        assert torch.equal(b_ih[h:2 * h] + b_hh[h:2 * h], torch.ones(h))
        assert float(b_ih[:h].abs().max()) > 0  # the input gate's random init is left alone
