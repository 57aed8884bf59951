"""The bounded update-norm snapshot (graddoctor.core._snapshot): memory, coverage, values, and its readers.

Oracles: the weights before and after each optimizer step, copied by the test and differenced in float64;
the bytes of the copies the snapshot holds, read from their storages; a float64 ratio over the measured tensors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor._errors import ConfigError
from graddoctor.core._snapshot import UpdateSnapshot, is_bounded, measured_mask, pack_subsets
from graddoctor.diagnosis._data import RunData
from graddoctor.mirror._rows import UPDATE_RATIO, RowMaker

U32 = 2.0 ** -24  # float32 unit roundoff


def _model() -> nn.Module:
    torch.manual_seed(0)  # tensors of 64*32, 32, 32*16, 16, 16*8, 8, 8*1, 1 entries: 8 tensors, uneven sizes
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(),
                         nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))


@pytest.mark.parametrize("sizes,bound", [([3, 3, 3, 3], 5), ([2, 4, 2, 4, 2, 4], 4), ([7, 1, 1, 5, 2, 6, 3], 7),
                                         ([1], 1), ([10, 1, 9, 2, 8, 3], 10)])
def test_subsets_cover_every_tensor_once_and_stay_within_the_bound(sizes, bound):
    subsets = pack_subsets(sizes, bound)
    assert sorted(i for s in subsets for i in s) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in s) <= bound for s in subsets)
    # whole tensors cannot always reach ceil(total / bound) ([3, 3, 3, 3] in 5 needs 4, not 3); first fit
    # leaves no two subsets that could be merged, so fewer than 2 * total / bound + 1
    assert math.ceil(sum(sizes) / bound) <= len(subsets) < 2 * sum(sizes) / bound + 1


def test_bounded_snapshot_holds_at_most_the_largest_tensor_and_matches_a_float64_oracle():
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    snap = UpdateSnapshot(params, torch.device("cpu"), sample_every=1, bounded=True)
    largest = max(p.numel() * p.element_size() for p in params)
    total = sum(p.numel() for p in params)
    n = len(snap.subsets)
    assert n <= math.ceil(2 * total / snap.bound)
    seen = np.zeros(len(params), dtype=bool)
    for step in range(n + 2):
        x = torch.randn(16, 32)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = [p.detach().double().clone() for p in params]
        weight_norms = snap.take(step)
        held = sum(c.untyped_storage().nbytes() for c in snap._taken[2])  # the copies the snapshot keeps
        assert held <= largest
        np.testing.assert_allclose(weight_norms.numpy(), [b.norm().item() for b in before], rtol=max(p.numel() for p in params) * U32)  # a float32 sum of n squares: n u
        opt.step()
        s, row = snap.update_norms()
        assert s == step
        oracle = np.array([(p.detach().double() - b).norm().item() for p, b in zip(params, before)])
        measured = measured_mask(snap.meta(), np.array([step]), len(params))[0]
        assert np.isnan(row.numpy()[~measured]).all() and np.isfinite(row.numpy()[measured]).all()
        # float32 weights differenced in float32: each entry's difference is exact (Sterbenz) or within
        # u |w|; the norm's sum of squares adds ~n u. Bound: u (|w_before| + |w_after|) / |update| + n u.
        for i in np.flatnonzero(measured):
            scale = (before[i].norm().item() + params[i].detach().double().norm().item())
            tol = U32 * scale + params[i].numel() * U32 * oracle[i]
            assert abs(row[i].item() - oracle[i]) <= tol
        seen |= measured
        if step == n - 1:
            assert seen.all(), "every tensor is measured within one round of the subsets"


def test_full_snapshot_measures_every_tensor_every_sample():
    params = list(_model().parameters())
    snap = UpdateSnapshot(params, torch.device("cpu"), sample_every=3, bounded=False)
    assert snap.meta() == {"mode": "full"}
    assert measured_mask(snap.meta(), np.array([0, 3, 6]), len(params)).all()
    assert measured_mask(None, np.array([0, 3]), len(params)).all()  # older stores: no plan, all measured


def test_snapshot_mode_from_the_environment(monkeypatch):
    assert not is_bounded(torch.device("cpu")) and is_bounded(torch.device("meta"))
    monkeypatch.setenv("GRADDOCTOR_SNAPSHOT", "bounded")
    assert is_bounded(torch.device("cpu"))
    monkeypatch.setenv("GRADDOCTOR_SNAPSHOT", "partial")
    with pytest.raises(ConfigError, match="GRADDOCTOR_SNAPSHOT='partial'"):
        is_bounded(torch.device("cpu"))


def _train(run_dir, steps: int = 12):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gd.watch(model, opt, run_dir=run_dir, sample_every=2, flush_every=4, live_diagnosis=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    return RunData.from_run(gd.open_run(run_dir))


def test_a_bounded_run_stores_partial_rows_that_readers_tell_from_nonfinite(tmp_path, monkeypatch):
    full = _train(tmp_path / "full")
    monkeypatch.setenv("GRADDOCTOR_SNAPSHOT", "bounded")
    part = _train(tmp_path / "bounded")
    plan = part.meta["update_snapshot"]
    assert plan["mode"] == "bounded" and full.meta["update_snapshot"] == {"mode": "full"}
    measured = part.update_measured
    assert measured.sum(axis=1).min() >= 1 and not measured.all()
    assert np.isnan(part.update_norm[~measured]).all()
    # the same training: measured entries equal the full run's (rounding of two ways to difference)
    np.testing.assert_allclose(part.update_norm[measured], full.update_norm[measured], rtol=1e-5)
    ratio = part.log_update_ratio
    e = part.eligible
    assert not np.isinf(ratio).any(), "a tensor not measured is not a non-finite update"
    assert np.isnan(ratio[~measured[:, e]]).all()
    np.testing.assert_allclose(ratio[measured[:, e]], full.log_update_ratio[measured[:, e]], atol=1e-5)
    # mirrors: the global ratio over the tensors measured at that sample, against a float64 oracle
    maker = RowMaker(part.tensors, 2, update_plan=plan)
    maker.rows([("weight_norm", part.sample_steps, part.weight_norm)])
    rows = maker.rows([("update_norm", part.update_steps, part.update_norm)])
    for u, step in enumerate(part.update_steps.tolist()):
        m = measured[u]
        wrow = part.weight_norm[list(part.sample_steps).index(step)].astype(np.float64)
        oracle = math.sqrt(np.sum(part.update_norm[u][m].astype(np.float64) ** 2) / np.sum(wrow[m] ** 2))
        assert rows[step][UPDATE_RATIO] == pytest.approx(oracle, rel=1e-12)
