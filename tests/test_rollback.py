"""Rollback restores model, optimizer, scheduler and RNG bit for bit, skips batches, and gives up after M."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor import treat


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
    return model, opt, sched


def batch(i, n=32, outlier=1.0):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(n, 5, generator=g)
    return x * outlier, (x[:, 0] > 0).long()


def train_step(model, opt, sched, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss


def state_of(model, opt, sched):
    return copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), torch.get_rng_state()))


def assert_equal_states(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_states(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_states(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("on_disk", [False, True])
def test_rollback_restores_bit_identical_state_and_training_continues(tmp_path, on_disk):
    model, opt, sched = setup()
    rb = treat.rollback(model, opt, sched, every=5, keep=2, skip=3, directory=tmp_path if on_disk else None)
    for i in range(20):
        assert rb.step(train_step(model, opt, sched, *batch(i)))
    good = state_of(model, opt, sched)  # the snapshot at step 20
    x, y = batch(20)
    x[0, 0] = float("nan")  # a NaN batch: the weights become NaN
    loss = train_step(model, opt, sched, x, y)
    assert not torch.isfinite(next(model.parameters())).all()
    assert rb.step(loss) is False
    assert_equal_states(state_of(model, opt, sched), good)
    assert rb.rollbacks[0][:2] == (21, 20) and "nan" in rb.rollbacks[0][2]
    # the loader keeps going: the next 3 batches are dropped, then training resumes
    trained = []
    for i in range(21, 30):
        if rb.skipping():
            continue
        trained.append(i)
        rb.step(train_step(model, opt, sched, *batch(i)))
    assert trained == list(range(24, 30))
    ref_model, ref_opt, ref_sched = setup()  # (setup reseeds torch: only after the real run)
    ref_model.load_state_dict(good[0])
    ref_opt.load_state_dict(good[1])
    ref_sched.load_state_dict(good[2])
    torch.set_rng_state(good[3])
    for i in trained:  # the same batches from the same state give the same weights: nothing else leaked
        train_step(ref_model, ref_opt, ref_sched, *batch(i))
    assert_equal_states(model.state_dict(), ref_model.state_dict())
    if on_disk:
        assert len(list(tmp_path.glob("rollback-*.pt"))) == 2  # bounded


def test_loss_spike_triggers_rollback_and_is_recorded(tmp_path):
    model, opt, sched = setup(1)
    with gd.watch(model, opt, tmp_path / "run", flush_every=10) as w:
        rb = treat.rollback(model, opt, sched, every=10, watch=w)
        for i in range(30):
            x, y = batch(i, outlier=1e4 if i == 25 else 1.0)
            loss = train_step(model, opt, sched, x, y)
            w.step(loss)
            kept = rb.step(loss)
            assert kept == (i != 25)
    events = gd.open_run(tmp_path / "run").events("rollback")
    assert len(events) == 1 and events[0]["data"]["restored_step"] == 20 and "max" in events[0]["data"]["reason"]


def test_repeated_spike_goes_one_snapshot_further_back_then_gives_up():
    model, opt, sched = setup(2)
    rb = treat.rollback(model, opt, sched, every=5, keep=3, skip=0, max_rollbacks=2)
    for i in range(15):
        rb.step(train_step(model, opt, sched, *batch(i)))
    rb.step(float("inf"))
    assert rb.rollbacks[-1][1] == 15
    rb.step(float("nan"))  # again before a new snapshot: that snapshot is suspect
    assert rb.rollbacks[-1][1] == 10
    with pytest.raises(treat.RollbackLimitError, match="rolled back 2 times"):
        rb.step(float("nan"))


def test_is_spike_decision_table():
    calm = [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    assert treat.is_spike(float("nan"), calm, 3, 2, 10)[0]
    assert treat.is_spike(float("inf"), [], 3, 2, 10)[0]
    assert treat.is_spike(10.0, calm, 3, 2, 10)[0]
    assert not treat.is_spike(1.2, calm, 3, 2, 10)[0]
    assert not treat.is_spike(10.0, calm[:5], 3, 2, 10)[0]  # too little history to judge
    tail = [0.02] * 18 + [0.05, 0.06]  # near convergence mini-batch losses are heavy-tailed
    assert not treat.is_spike(0.09, tail, 3, 2, 10)[0]  # 4.5x the median, but within 2x of what was seen
    assert treat.is_spike(0.5, tail, 3, 2, 10)[0]


def test_defaults_scale_with_run_length():
    model, opt, sched = setup()
    assert treat.rollback(model, opt).every == 50
    rb = treat.rollback(model, opt, total_steps=10_000)
    assert (rb.every, rb.skip) == (50, 50)
    rb = treat.rollback(model, opt, total_steps=1_000)
    assert (rb.every, rb.skip) == (5, 5)
    assert treat.rollback(model, opt, total_steps=1_000, every=7, skip=30).skip == 30


def test_bad_options():
    model, opt, sched = setup()
    with pytest.raises(gd.ConfigError, match="every=0"):
        treat.rollback(model, opt, every=0)
