"""Regularization against the optimizers' own weight decay; REMEDIES covers exactly the shared ids."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graddoctor as gd
from _numerics import U32, adam_drift_atol, gamma
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


def run(model, opt, penalty=None, steps=5, record=None, decay=0.0):
    """Train; with `record`, append per step and tensor (|g| + decay |w|, |g + decay w|, |w|) in float64,
    g the loss's gradient alone: what a step's weight-decayed gradient is made of."""
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if record is not None:
            grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            record.append([((gl.double().abs() + decay * w.detach().double().abs()),
                            (gl.double() + decay * w.detach().double()).abs(), w.detach().double().abs())
                           for gl, w in zip(grads, model.parameters())])
        if penalty is not None:
            loss = loss + penalty(model)
        opt.zero_grad(); loss.backward(); opt.step()


def decay_trajectory_atol(record, lr: float, adam: bool) -> list[torch.Tensor]:
    """First-order bound on |p_a - p_b| per entry after training with the L2 penalty and with weight_decay.

    Per step the two decayed gradients g + d w differ by <= 8u (|g| + d |w|): each side forms it within
    4 roundings (the float32 d, its product with w, the sum, the 2 of the square's backward). SGD moves
    that by lr times it, and each side rounds lr g and w - lr g once; Adam: _numerics.adam_drift_atol.
    The feedback of a difference into the next gradient is second order over 5 small steps, left out.
    """
    out = []
    for i in range(len(record[0])):
        spread = [step[i][0] for step in record]
        size = [step[i][1] for step in record]
        w = [step[i][2] for step in record]
        if adam:
            out.append(adam_drift_atol(size, [8 * U32 * a for a in spread], w, lr))
        else:
            out.append(sum(lr * 8 * U32 * a + 2 * U32 * (wt + lr * b) for a, b, wt in zip(spread, size, w)))
    return out


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_l2_penalty_equals_coupled_weight_decay(opt_cls):
    a, b = twins()
    record = []
    run(a, opt_cls(a.parameters(), lr=0.05), lambda m: treat.l2_penalty(m, 0.1, include_bias=True), record=record,
        decay=0.1)
    run(b, opt_cls(b.parameters(), lr=0.05, weight_decay=0.1))
    for p, q, atol in zip(a.parameters(), b.parameters(), decay_trajectory_atol(record, 0.05, opt_cls is torch.optim.Adam)):
        assert ((p - q).detach().double().abs() <= atol).all()


def test_l2_penalty_differs_from_adamw_decoupled_decay():
    a, b = twins()
    run(a, torch.optim.Adam(a.parameters(), lr=0.05), lambda m: treat.l2_penalty(m, 0.1, include_bias=True))
    run(b, torch.optim.AdamW(b.parameters(), lr=0.05, weight_decay=0.1))
    assert max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters())) > 1e-3


def test_l1_penalty_gradient_is_sign():
    model = nn.Linear(5, 3)
    treat.l1_penalty(model, 0.3).backward()
    # the backward of 0.3 * sum |w| is 0.3 (rounded to float32, as PyTorch rounds the Python scalar) x sign(w): exact
    assert torch.equal(model.weight.grad, torch.tensor(0.3, dtype=torch.float32) * model.weight.detach().sign())
    assert model.bias.grad is None  # biases are left out unless include_bias=True
    # the same sum formed two ways in float32 (15 + 3 terms, all >= 0): each within gamma_17 of the exact
    # sum (and 2 roundings for 0.3: its float32 value and the product)
    want = 0.3 * float(model.weight.detach().double().abs().sum() + model.bias.detach().double().abs().sum())
    got = treat.l1_penalty(model, 0.3, include_bias=True).item()
    assert abs(got - want) <= (gamma(17) + 2 * U32) * want


def test_remedies_cover_exactly_the_shared_ids():
    assert set(treat.REMEDIES) == SHARED_IDS
    for rid, impl in treat.REMEDIES.items():
        assert callable(impl) or (isinstance(impl, str) and impl.strip()), rid


def test_remedies_match_the_diagnose_catalogue():
    catalogue = pytest.importorskip("graddoctor.diagnosis._remedies").CATALOGUE
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
