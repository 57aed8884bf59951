"""Activation statistics in modern models: activations found by behaviour (HF GPT-2's NewGELUActivation, SiLU,
user-written modules), the functional activation of nn.TransformerEncoderLayer sampled from linear1's output, and
one clear warning where none can be found.

The oracle of each statistic is the reference activation applied in float64 to the pre-activation this test
captures with its own forward hook; the tolerances come from float32 rounding (tests/_numerics.py).
"""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _numerics import U32, torch_mean_std_bounds
from torch import nn

import graddoctor as gd
from graddoctor.core._layers import activation_kind, activation_sites, probe_activation, probe_input

MARGIN = 0.01  # watch's default saturation_margin


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def gelu_tanh64(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def elementwise_error(x, y):
    """Bound on |float32 f(x) - f(x) in float64| for an activation formula of <= ~8 float32 operations.

    Each rounding is relative to an intermediate no larger than max(1, |x|, |y|) up to a small factor
    (GELU: 0.5 * x * (1 + tanh(z)), where |z sech(z)^2| < 0.5 keeps tanh's input error from growing);
    libm's tanh/erf/exp are within 4 ulp. 16 u per unit of (1 + |x| + |y|) covers that sum.
    """
    return 16 * U32 * (1.0 + x.abs() + y.abs())


def assert_row_matches(got, pre, reference, bounds=None):
    """One recorded activation row against `reference(pre)` in float64, field by field.

    mean and std: PyTorch's float32 reductions (torch_mean_std_bounds) plus the elementwise error (a mean moves
    by at most the mean error, a std by at most the RMS of the errors). Fractions: an element within its error
    of 0 (or of a saturation threshold) may fall either way in float32, so the oracle is an interval.
    """
    x = pre.detach().double()
    y = reference(x)
    err = elementwise_error(x, y)
    e_mean, e_std = torch_mean_std_bounds(y.float())
    mean, std, sat, zero, dead, nonfinite = (float(v) for v in got)
    assert abs(mean - float(y.mean())) <= e_mean + float(err.mean()) + U32 * abs(float(y.mean()))
    assert abs(std - float(y.std())) <= e_std + float(err.pow(2).sum().div(y.numel() - 1).sqrt())
    n = y.numel()
    sure_zero, maybe_zero = (y == 0), (y.abs() <= err)
    # the recorded fraction is a count divided once in float32
    assert float(sure_zero.sum()) / n * (1 - U32) <= zero <= float(maybe_zero.sum()) / n * (1 + U32)
    units = y.shape[-1] if y.ndim == 3 else y.shape[1]
    per_unit = (lambda m: m.reshape(-1, units).all(0)) if y.ndim == 3 else (lambda m: m.transpose(0, 1)
                                                                            .reshape(units, -1).all(1))
    lo_dead, hi_dead = float(per_unit(sure_zero).double().mean()), float(per_unit(maybe_zero).double().mean())
    assert lo_dead * (1 - U32) - U32 <= dead <= hi_dead * (1 + U32) + U32
    if bounds is None:
        assert math.isnan(sat)
    else:
        lo, hi = bounds
        m = MARGIN * (hi - lo)
        sure = (y <= lo + m - err) | (y >= hi - m + err)
        maybe = (y <= lo + m + err) | (y >= hi - m - err)
        assert float(sure.sum()) / n * (1 - U32) <= sat <= float(maybe.sum()) / n * (1 + U32)
    assert nonfinite == 0


def capture_inputs(modules):
    """Forward hooks that keep each module's input (the pre-activation) of every call."""
    seen = {m: [] for m in modules}
    for m in modules:
        m.register_forward_hook(lambda mod, inp, out: seen[mod].append(inp[0].detach().clone()))
    return seen


def capture_outputs(modules):
    seen = {m: [] for m in modules}
    for m in modules:
        m.register_forward_hook(lambda mod, inp, out: seen[mod].append(out.detach().clone()))
    return seen


def tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))


def train_gpt2(model, run_dir, steps, activation_every=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    with gd.watch(model, opt, run_dir, activation_every=activation_every) as w:
        for _ in range(steps):
            ids = torch.randint(0, 64, (4, 16), generator=g)
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()


@pytest.mark.slow
def test_gpt2_gets_one_gelu_tanh_activation_per_block_matching_the_oracle(tmp_path):
    model = tiny_gpt2(0)
    acts = [block.mlp.act for block in model.transformer.h]
    # HF's NewGELUActivation is no torch.nn class: the probe finds it is the tanh-approximated GELU
    assert all(probe_activation(a.forward).reference == "gelu_tanh" for a in acts)
    pre = capture_inputs(acts)
    train_gpt2(model, tmp_path, steps=3)
    run = gd.open_run(tmp_path)
    assert run.activation_modules == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    assert [run.activation_kinds[m] for m in run.activation_modules] == ["gelu", "gelu"]
    assert run.meta["activations_off"] is None
    steps, rows = run.activations()
    assert steps.tolist() == [0, 1, 2]
    for s in range(3):
        for j, a in enumerate(acts):
            assert_row_matches(rows[s, j], pre[a][s], gelu_tanh64)


def encoder_model(activation, norm_first, seed):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=norm_first)
    model = nn.Sequential()
    model.add_module("enc", nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
    model.add_module("head", nn.Linear(16, 1))
    return model


def train_encoder(model, run_dir, steps, activation_every=1, seed=0, lr=1e-3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with gd.watch(model, opt, run_dir, activation_every=activation_every) as w:
        for _ in range(steps):
            x = torch.randn(8, 6, 16, generator=g)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_activation_is_sampled_from_linear1(tmp_path, activation, norm_first):
    model = encoder_model(activation, norm_first, seed=1)
    linear1 = [layer.linear1 for layer in model.enc.layers]
    with torch.no_grad():
        linear1[0].bias[:5] = -100.0  # five dead units in the first layer (relu: exactly zero)
    pre = capture_outputs(linear1)
    train_encoder(model, tmp_path, steps=2)
    run = gd.open_run(tmp_path)
    assert run.activation_modules == ["enc.layers.0.activation", "enc.layers.1.activation"]
    assert [run.activation_kinds[m] for m in run.activation_modules] == [activation, activation]
    steps, rows = run.activations()
    assert steps.tolist() == [0, 1]
    reference = F.relu if activation == "relu" else (lambda x: 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0))))
    for s in range(2):
        for j, lin in enumerate(linear1):
            assert_row_matches(rows[s, j], pre[lin][s], reference)
            if activation == "relu":  # relu of the same float32 values: the fractions are exact
                y = F.relu(pre[lin][s].double())
                dead = float((y == 0).reshape(-1, 32).all(0).double().mean())
                assert rows[s, j, 4] == pytest.approx(dead, rel=U32, abs=0)
                assert rows[s, j, 3] == pytest.approx(float((y == 0).double().mean()), rel=U32, abs=0)
    assert rows[0, 0, 4] >= 5 / 32  # the units switched off by hand are seen


def test_transformer_encoder_hooks_linear1_only_on_sampled_steps(tmp_path):
    model = encoder_model("relu", False, seed=0)
    lin = model.enc.layers[0].linear1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gd.watch(model, opt, tmp_path, activation_every=2) as w:
        for step in range(5):
            assert bool(lin._forward_hooks) == (step % 2 == 0), step
            model(torch.randn(2, 3, 16)).sum().backward()
            w.step()
            opt.step()
    assert not lin._forward_hooks
    assert gd.open_run(tmp_path).activations()[0].tolist() == [0, 2, 4]


class MyAct(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class MySigmoid(nn.Module):
    def forward(self, x):
        return 1.0 / (1.0 + torch.exp(-x))


class MyLeaky(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.2 * x)


class MyClamp(nn.Module):
    def forward(self, x):
        return x.clamp(-2.0, 3.0)


def hf(name, **kwargs):
    from transformers import activations
    return getattr(activations, name)(**kwargs)


RECOGNISED = [
    (lambda: nn.SiLU(), "silu", None), (lambda: nn.Mish(), "mish", None), (lambda: nn.Softplus(), "softplus", None),
    (lambda: hf("QuickGELUActivation"), "quick_gelu", None), (lambda: hf("NewGELUActivation"), "gelu", None),
    (lambda: hf("GELUActivation"), "gelu", None), (lambda: hf("FastGELUActivation"), "gelu", None),
    (lambda: hf("SiLUActivation"), "silu", None), (lambda: hf("ClippedGELUActivation", min=-10, max=10), "gelu", None),
    (lambda: hf("ReLUSquaredActivation"), "relu_squared", None), (MyAct, "silu", None),
    (MySigmoid, "sigmoid", (0.0, 1.0)), (MyLeaky, "leaky_relu", None), (MyClamp, "hardtanh", (-2.0, 3.0)),
]


@pytest.mark.parametrize("make,kind,bounds", RECOGNISED)
def test_activation_modules_are_recognised_by_behaviour(make, kind, bounds):
    k = activation_kind(make())
    assert k is not None and k.kind == kind and k.bounds == bounds


def test_the_probe_finds_the_leaky_slope_for_init():
    from graddoctor.core._layers import activation_name
    name, slope = activation_name(MyLeaky())
    assert name == "leaky_relu" and slope == pytest.approx(0.2, rel=4 * U32)


class Noise(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


class Centre(nn.Module):  # mixes elements: not elementwise
    def forward(self, x):
        return torch.tanh(x - x.mean())


class Scale(nn.Module):  # linear
    def forward(self, x):
        return 2.0 * x + 1.0


NOT_ACTIVATIONS = [lambda: nn.Dropout(0.5), nn.Identity, lambda: nn.Softmax(-1), lambda: nn.LayerNorm(8),
                   lambda: nn.LayerNorm(101, elementwise_affine=False), lambda: hf("LinearActivation"), Noise, Centre,
                   Scale, nn.Flatten, lambda: nn.MaxPool1d(2)]


@pytest.mark.parametrize("make", NOT_ACTIVATIONS)
def test_non_activations_are_not_recognised_and_the_probe_draws_no_random_number(make):
    module = make().train()
    state = torch.random.get_rng_state()
    assert activation_kind(module) is None
    assert torch.equal(torch.random.get_rng_state(), state)


def test_probe_rejects_what_is_random_mixes_elements_or_is_affine_and_copes_with_in_place():
    state = torch.random.get_rng_state()
    for fn in (Noise().forward, Centre().forward, Scale().forward, nn.LayerNorm(101, elementwise_affine=False).forward,
               nn.Softmax(-1).forward, lambda x: x[:-1].tanh(), lambda x: "not a tensor"):
        assert probe_activation(fn) is None
    assert torch.equal(torch.random.get_rng_state(), state)
    inplace = nn.Module()
    inplace.forward = lambda x: x.sigmoid_()
    assert probe_activation(inplace.forward).reference == "sigmoid"
    assert torch.equal(probe_input(), torch.linspace(-10.0, 10.0, 101))


class Remembers(nn.Module):
    """An activation that keeps its last output (for a plot, say): the probe's call must not replace it."""

    def forward(self, x):
        self.last = torch.tanh(x)
        self.calls = getattr(self, "calls", 0) + 1
        return self.last


def test_the_probe_leaves_a_modules_attributes_as_they_were():
    m = Remembers()
    m(torch.ones(3))
    last = m.last
    assert activation_kind(m).kind == "tanh"
    assert m.last is last and m.calls == 1


def test_user_activation_statistics_match_the_oracle_with_bounds_from_the_probe(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(8, 64)
    with torch.no_grad():
        lin.weight.mul_(6.0)  # push some units into saturation
    model = nn.Sequential(lin, MySigmoid(), nn.Linear(64, 1))
    pre = capture_outputs([lin])
    with gd.watch(model, run_dir=tmp_path, activation_every=1) as w:
        model(torch.randn(32, 8)).sum().backward()
        w.step()
    run = gd.open_run(tmp_path)
    assert run.activation_modules == ["1"] and run.activation_kinds["1"] == "sigmoid"
    _, rows = run.activations()
    assert_row_matches(rows[0, 0], pre[lin][0], torch.sigmoid, bounds=(0.0, 1.0))
    assert rows[0, 0, 2] > 0.1  # the test reaches saturation at all


class NanoMLP(nn.Module):
    """nanoGPT's old MLP: the activation is a function call, which no hook can see."""

    def __init__(self):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def _watch_quietly_after(model, run_dir, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gd.watch(model, None, run_dir, **options) as w:
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
                w.step()
    return [str(c.message) for c in caught if "activation statistics off" in str(c.message)]


def test_a_model_without_activation_modules_says_so_once(tmp_path):
    said = _watch_quietly_after(NanoMLP(), tmp_path / "nano", activation_every=1)
    assert said == ["graddoctor: activation statistics off: no activation modules found in NanoMLP (activations "
                    "called as functions in forward, such as F.gelu(x), cannot be hooked; use an activation module "
                    "such as nn.GELU(), or set activation_every=0 to silence this)"]
    run = gd.open_run(tmp_path / "nano")
    assert run.activation_modules == [] and run.meta["activations_off"].startswith("no activation modules found")
    # asked for no activation statistics: no warning, and the store says why there are none
    assert _watch_quietly_after(NanoMLP(), tmp_path / "off", activation_every=0) == []
    assert gd.open_run(tmp_path / "off").meta["activations_off"] == "activation_every=0"


@pytest.mark.slow  # torch.compile imports dynamo (~2 s)
def test_a_compiled_model_says_activation_statistics_are_off(tmp_path):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model)  # compiles at its first call, which this test never makes
    with pytest.warns(RuntimeWarning, match="activation statistics off: Sequential is compiled with torch.compile"):
        w = gd.watch(compiled, None, tmp_path)
    w.close()
    run = gd.open_run(tmp_path)
    assert run.activation_modules == [] and "torch.compile" in run.meta["activations_off"]


def test_sites_of_a_decoder_layer_and_of_an_activation_module_passed_to_a_layer():
    dec = nn.TransformerDecoderLayer(16, 2, 32, activation="gelu")
    assert [(s.name, s.kind.kind, s.module) for s in activation_sites(dec)] == [("activation", "gelu", dec.linear1)]
    enc = nn.TransformerEncoderLayer(16, 2, 32, activation=nn.SiLU())
    assert [(s.name, s.kind.kind, s.function) for s in activation_sites(enc)] == [("activation", "silu", None)]


ACTIVATION_RULES = {"saturated_activation", "dead_relu", "poor_initialization"}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_transformer_runs_raise_no_activation_finding(tmp_path, seed):
    gpt = tiny_gpt2(seed)
    train_gpt2(gpt, tmp_path / "gpt2", steps=20, activation_every=5, seed=seed)
    enc = encoder_model("relu", False, seed)
    train_encoder(enc, tmp_path / "enc", steps=20, activation_every=5, seed=seed)
    for run_dir in (tmp_path / "gpt2", tmp_path / "enc"):
        run = gd.open_run(run_dir)
        _, rows = run.activations()
        assert rows.shape[:2] == (4, 2) and np.isfinite(rows[:, :, 1]).all()  # the rules had data to read
        found = {f.code for f in gd.diagnose(run_dir)}
        assert not found & ACTIVATION_RULES, found
