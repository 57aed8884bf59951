"""Activation statistics of each kind against direct computation on the same outputs."""
import math

import pytest
import torch
from torch import nn

import graddoctor as gd
from _numerics import U32, torch_mean_std_bounds

KINDS = [(nn.Sigmoid, (0.0, 1.0)), (nn.Tanh, (-1.0, 1.0)), (nn.ReLU, None), (nn.LeakyReLU, None), (nn.ELU, None)]


def direct(out, bounds, margin=0.01):
    x = out.detach().double()
    sat = math.nan
    if bounds:
        lo, hi = bounds
        m = margin * (hi - lo)
        sat = float(((x <= lo + m) | (x >= hi - m)).double().mean())
    dead = float((x == 0).all(dim=0).double().mean())
    return [float(x.mean()), float(x.std()), sat, float((x == 0).double().mean()), dead, 0.0]


@pytest.mark.parametrize("cls,bounds", KINDS)
def test_activation_statistics_match_direct_computation(tmp_path, cls, bounds):
    torch.manual_seed(0)
    lin = nn.Linear(8, 64)
    with torch.no_grad():
        lin.weight.mul_(6.0)  # push some units into saturation / zero
        lin.bias[:5] = -100.0  # five dead (or saturated) units
    model = nn.Sequential(lin, cls(), nn.Linear(64, 1))
    captured = {}
    model[1].register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach().clone()))
    x = torch.randn(32, 8)
    with gd.watch(model, run_dir=tmp_path, activation_every=1) as w:
        model(x).sum().backward()
        w.step()
    run = gd.open_run(tmp_path)
    steps, acts = run.activations()
    assert run.activation_modules == ["1"]
    assert steps.tolist() == [0]
    expected = direct(captured["out"], bounds)
    # mean and std: PyTorch's float32 reductions against float64 (_numerics.torch_mean_std_bounds); the
    # fractions are exact counts (the float32 bounds 0.01 and 0.99 split the float32 values as the float64
    # ones do) divided once in float32; the non-finite count is exact
    e_mean, e_std = torch_mean_std_bounds(captured["out"])
    atol = torch.tensor([e_mean, e_std, 0, 0, 0, 0], dtype=torch.float64)
    rtol = torch.tensor([0, 0, U32, U32, U32, 0], dtype=torch.float64)
    got, want = torch.tensor(acts[0, 0], dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    same_nan = got.isnan() & want.isnan()
    assert ((got - want).abs() <= atol + rtol * want.abs())[~same_nan].all() and (got.isnan() == want.isnan()).all()


def test_hooks_exist_only_on_sampled_steps(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with gd.watch(model, run_dir=tmp_path, activation_every=3) as w:
        for step in range(7):
            hooked = bool(model[1]._forward_hooks)
            assert hooked == (step % 3 == 0), step
            model(torch.randn(5, 4)).sum().backward()
            w.step()
    assert not model[1]._forward_hooks
    steps, _ = gd.open_run(tmp_path).activations()
    assert steps.tolist() == [0, 3, 6]


def test_nonfinite_activations_are_counted(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    with gd.watch(model, run_dir=tmp_path, activation_every=1) as w:
        model(x).sum().backward()
        w.step()
    run = gd.open_run(tmp_path)
    _, acts = run.activations()
    # NaN in one input row makes that row's 4 outputs NaN; ReLU keeps them NaN.
    assert acts[0, 0, 5] == 4
    _, inputs = run.inputs()
    assert inputs[0, 1] == 1 and math.isnan(inputs[0, 0])
