"""The sync-free skip guard (graddoctor.treat.skip_step).

Oracles: a twin model trained on the good batches only (a guarded run with bad steps inserted must end
bit for bit equal to it); copies of the weights and optimizer state taken before a bad step; a float64
numpy mean + 6 sigma over the accepted norms; the meta device, on which any host read of a value raises.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor._errors import ConfigError
from graddoctor.treat import Guard, interventions, skip_nonfinite, skip_step

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(32, 6, generator=g) for _ in range(n)]


def _state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v.detach().clone() for s in opt.state.values() for v in s.values()]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _step(model, opt, w, x, spoil=None) -> None:
    opt.zero_grad()
    loss = model(x).pow(2).mean()
    loss.backward()
    if spoil is not None:
        spoil(model)
    w.step(loss)
    opt.step()


def _nan(model):
    model[0].weight.grad[1, 2] = float("nan")


def _spike(model):
    for p in model.parameters():
        p.grad.mul_(1e4)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bad_steps_leave_weights_and_state_untouched_and_good_steps_train_as_without_the_guard(name):
    batches = _batches(30)
    bad = {0: _nan, 12: _nan, 20: _spike}  # step 0: before the optimizer has any state
    model = _model()
    opt = OPTIMIZERS[name](model.parameters())
    w = gd.watch(model, opt, guard=skip_step(opt, warmup=5))
    for i, x in enumerate(batches):
        before, state = [p.detach().clone() for p in model.parameters()], _state(opt)
        _step(model, opt, w, x, bad.get(i))
        if i in bad:
            assert _equal(before, [p.detach() for p in model.parameters()]), f"weights moved at bad step {i}"
            if i:
                assert _equal(state, _state(opt)), f"{name} state moved at bad step {i}"
        else:
            assert not _equal(before, [p.detach() for p in model.parameters()])
    w.close()
    assert int(w.guard.state.skipped_total) == len(bad)
    twin = _model()  # the oracle: the same training without the bad steps and without the guard
    twin_opt = OPTIMIZERS[name](twin.parameters())
    for i, x in enumerate(batches):
        if i not in bad:
            twin_opt.zero_grad()
            twin(x).pow(2).mean().backward()
            twin_opt.step()
    assert _equal([p.detach() for p in twin.parameters()], [p.detach() for p in model.parameters()])
    assert _equal(_state(twin_opt), _state(opt))


def test_the_spike_rule_matches_a_float64_mean_plus_sigma_std():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=0.1)
    window, warmup, sigma = 6, 3, 2.0
    guard = Guard(skip_step(opt, sigma=sigma, window=window, warmup=warmup), [p])
    rng = np.random.default_rng(0)
    norms = np.abs(rng.normal(1.0, 0.3, 40)).astype(np.float32)
    norms[[5, 11, 12, 30]] *= 6
    accepted: list[float] = []
    for x in norms:
        p.grad = torch.full((4,), float(x) / 2)  # norm of 4 equal entries: 2 |entry|
        guard.step()
        opt.step()
        hist = np.array(accepted[-window:], dtype=np.float64)
        x32 = float(torch.full((4,), float(x) / 2).norm())
        skip = len(accepted) >= warmup and x32 > hist.mean() + sigma * hist.std(ddof=1)
        assert bool(~guard.state.ok) == skip
        if not skip:
            accepted.append(x32)
    assert 0 < int(guard.state.skipped_total) < len(norms)


def test_no_host_read_in_a_guarded_step_on_the_meta_device():
    model = _model("meta")  # any .item(), bool() or copy to the host of a meta tensor raises
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    w = gd.watch(model, opt, guard=skip_step(opt, warmup=2))
    for _ in range(4):
        opt.zero_grad()
        loss = model(torch.randn(8, 6, device="meta")).pow(2).mean()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    # the control: the one-sync guard does read the host, and the meta device says so
    model = _model("meta")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gd.watch(model, opt, guard=skip_nonfinite())
    opt.zero_grad()
    model(torch.randn(8, 6, device="meta")).sum().backward()
    with pytest.raises((RuntimeError, NotImplementedError)):
        w.step()


def test_each_skip_is_recorded_and_read_back(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gd.watch(model, opt, run_dir=tmp_path / "run", guard=skip_step(opt, warmup=3), live_diagnosis=False)
    for i, x in enumerate(_batches(8)):
        _step(model, opt, w, x, _nan if i in (2, 6) else None)
    w.close()
    events = gd.open_run(tmp_path / "run").events("guard")
    skipped = [e["step"] for e in events if e["data"]["skip_step.skipped"] == 1.0]
    assert skipped == [2, 6]
    assert [e["data"]["skip_step.nonfinite"] for e in events if e["step"] in (2, 6)] == [1.0, 1.0]
    assert any(row["what"] == "skip_step.skipped" for row in interventions(gd.open_run(tmp_path / "run")))


def test_host_side_state_and_bad_arguments_are_refused():
    p = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for kwargs, match in (({"sigma": 0}, "sigma=0"), ({"window": 1}, "window=1"), ({"warmup": 1.5}, "warmup=1.5")):
        with pytest.raises(ConfigError, match=match):
            skip_step(opt, **kwargs)
    with pytest.raises(ConfigError, match="takes a torch.optim.Optimizer"):
        skip_step(copy.copy([p]))  # type: ignore[arg-type]
    rprop = torch.optim.Rprop([p], lr=0.1)
    rprop.state[p]["note"] = 1.0  # a host value: not restorable without a sync
    guard = Guard(skip_step(rprop), [p])
    p.grad = torch.ones(3)
    guard.step()
    with pytest.raises(gd.GradDoctorError, match="'note'"):
        rprop.step()
