"""Regularization against the optimizers' own weight decay; REMEDIES covers exactly the shared ids."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor import treat

SHARED_IDS = {
    "clip_by_value", "clip_by_norm", "clip_per_tensor", "auto_clip", "agc", "zclip", "skip_nonfinite", "rollback",
    "lower_learning_rate", "sanitize_inputs", "l1_regularization", "l2_regularization", "relu", "leaky_relu", "elu",
    "he_init", "xavier_init", "lsuv_init", "orthogonal_init", "zero_residual_init", "batch_norm", "layer_norm",
    "residual_connections", "lstm", "gru", "layerwise_pretraining", "fewer_layers", "smaller_batches", "truncated_bptt",
}


def twins(seed=0):
    torch.manual_seed(seed)
    a = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    b = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def run(model, opt, penalty=None, steps=5):
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(); loss.backward(); opt.step()


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_l2_penalty_equals_coupled_weight_decay(opt_cls):
    a, b = twins()
    run(a, opt_cls(a.parameters(), lr=0.05), lambda m: treat.l2_penalty(m, 0.1, include_bias=True))
    run(b, opt_cls(b.parameters(), lr=0.05, weight_decay=0.1))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_l2_penalty_differs_from_adamw_decoupled_decay():
    a, b = twins()
    run(a, torch.optim.Adam(a.parameters(), lr=0.05), lambda m: treat.l2_penalty(m, 0.1, include_bias=True))
    run(b, torch.optim.AdamW(b.parameters(), lr=0.05, weight_decay=0.1))
    assert max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())) > 1e-3


def test_l1_penalty_gradient_is_sign():
    model = nn.Linear(5, 3)
    treat.l1_penalty(model, 0.3).backward()
    torch.testing.assert_close(model.weight.grad, 0.3 * model.weight.detach().sign())
    assert model.bias.grad is None  # biases are left out unless include_bias=True
    assert treat.l1_penalty(model, 0.3, include_bias=True).item() == pytest.approx(
        0.3 * (model.weight.abs().sum() + model.bias.abs().sum()).item(), rel=1e-6)


def test_remedies_cover_exactly_the_shared_ids():
    assert set(treat.REMEDIES) == SHARED_IDS
    for rid, impl in treat.REMEDIES.items():
        assert callable(impl) or (isinstance(impl, str) and impl.strip()), rid


def test_remedies_match_the_diagnose_catalogue():
    catalogue = pytest.importorskip("graddoctor.diagnose._remedies").CATALOGUE
    assert set(catalogue) == set(treat.REMEDIES)


def test_remedy_callables_work_on_a_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    model, changes = treat.REMEDIES["leaky_relu"](model)
    assert len(changes) == 2 and isinstance(model[1], nn.LeakyReLU)
    model, changes = treat.REMEDIES["batch_norm"](model)
    assert isinstance(model[1], nn.BatchNorm1d)
    assert treat.REMEDIES["he_init"](model)
    assert isinstance(treat.REMEDIES["clip_by_norm"](1.0), treat.GradientTransform)
    assert isinstance(gd.treat.REMEDIES["rollback"](model, torch.optim.SGD(model.parameters(), lr=0.1)), treat.Rollback)
