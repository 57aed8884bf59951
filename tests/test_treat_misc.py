"""Regularization against the optimizers' own weight decay; REMEDIES covers exactly the shared ids."""
from __future__ import annotations

import pytest
import torch
from _numerics import U32, adam_drift_atol, gamma
from torch import nn

import graddoctor as gd
from graddoctor import treat

SHARED_IDS = {
    "clip_value", "clip_norm", "clip_norm_per_tensor", "auto_clip", "agc", "zclip", "skip_nonfinite", "rollback",
    "lower_learning_rate", "sanitize_inputs", "l1_penalty", "l2_penalty", "relu", "leaky_relu", "elu",
    "he_init", "xavier_init", "lsuv_init", "orthogonal_init", "zero_residual_init", "batch_norm", "layer_norm",
    "add_residual", "rnn_to_lstm", "rnn_to_gru", "layerwise_pretrain", "fewer_layers", "smaller_batches",
    "truncated_bptt", "lr_warmup", "pre_layer_norm", "pass_scaler", "gpt2_init",
}
SHARED_IDS |= {"qk_norm", "z_loss"}  # issue 16: attention logit growth, output logit divergence
# former id -> current id: the ids became the names of the functions that apply the remedies
RENAMED = {"clip_by_value": "clip_value", "clip_by_norm": "clip_norm", "clip_per_tensor": "clip_norm_per_tensor",
           "l1_regularization": "l1_penalty", "l2_regularization": "l2_penalty", "residual_connections": "add_residual",
           "lstm": "rnn_to_lstm", "gru": "rnn_to_gru", "layerwise_pretraining": "layerwise_pretrain"}


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
        opt.zero_grad()
        loss.backward()
        opt.step()


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
    atols = decay_trajectory_atol(record, 0.05, opt_cls is torch.optim.Adam)
    for p, q, atol in zip(a.parameters(), b.parameters(), atols):
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
    assert set(treat.REMEDIES) == set(treat.CATALOGUE) == SHARED_IDS and len(treat.REMEDIES) == len(SHARED_IDS)
    for rid, impl in treat.REMEDIES.items():
        assert callable(impl) or (isinstance(impl, str) and impl.strip()), rid
        cure = treat.CATALOGUE[rid]
        assert cure.id == rid and impl is (cure.apply if cure.apply is not None else cure.snippet)


def test_diagnose_uses_the_one_catalogue():
    diagnosis = pytest.importorskip("graddoctor.diagnosis")
    assert diagnosis.CATALOGUE is treat.CATALOGUE


def test_former_ids_are_aliases_everywhere():
    from graddoctor.diagnosis import remedy
    for old, new in RENAMED.items():
        assert treat.CATALOGUE[old] is treat.CATALOGUE[new] and treat.CATALOGUE[new].aliases == (old,)
        assert old in treat.CATALOGUE and old in treat.REMEDIES and treat.REMEDIES[old] is treat.REMEDIES[new]
        assert remedy(old).id == new
    assert not set(RENAMED) & set(treat.CATALOGUE)  # iteration gives each remedy once, by its current id
    assert {a for c in treat.CATALOGUE.values() for a in c.aliases} == set(RENAMED)
    with pytest.raises(treat.UnknownRemedyError, match="unknown remedy id 'clip'"):
        treat.REMEDIES["clip"]
    with pytest.raises(KeyError):  # it is a KeyError too, as a Mapping's lookup should raise
        treat.CATALOGUE["clip"]
    assert treat.CATALOGUE.get("clip") is None


def test_ids_are_the_names_of_the_functions_that_apply_them():
    # the rule of treat/_catalogue.py: the function's name; `<scheme>_init` for gd.init.<scheme>_; for the
    # catalogue's own wrappers (swap_to_<activation>, add_<kind>_norm), the argument they pass on
    for cure in treat.CATALOGUE.values():
        if cure.apply is None:  # a change to the user's own code
            continue
        name, module = cure.apply.__name__, cure.apply.__module__
        if module == "graddoctor.treat.init":
            expected = f"{name}init"
        elif module == "graddoctor.treat._catalogue":
            expected = name.removeprefix("swap_to_").removeprefix("add_")
        else:
            expected = name
        assert cure.id == expected, (cure.id, module, name)


def test_remedy_callables_work_on_a_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2))
    model, changes = treat.REMEDIES["leaky_relu"](model)
    assert len(changes) == 2 and isinstance(model[1], nn.LeakyReLU)
    model, changes = treat.REMEDIES["batch_norm"](model)
    assert isinstance(model[1], nn.BatchNorm1d)
    assert treat.REMEDIES["he_init"](model)
    assert isinstance(treat.REMEDIES["clip_norm"](1.0), treat.GradientTransform)
    assert isinstance(treat.REMEDIES["clip_by_norm"](1.0), treat.GradientTransform)  # the former id
    assert isinstance(gd.treat.REMEDIES["rollback"](model, torch.optim.SGD(model.parameters(), lr=0.1)), treat.Rollback)
