"""Live diagnosis at flush: host data only, each finding once, stored in the run store."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.diagnosis import Finding
from graddoctor.diagnosis._live import FindingWarning, LiveDiagnosis

pytestmark = pytest.mark.filterwarnings("ignore::graddoctor.diagnosis._live.FindingWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only spins on a shared box
    yield
    torch.set_num_threads(threads)


def _train(run_dir, steps, nan_at=None, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = gd.watch(model, opt, run_dir, **options)
    for step in range(steps):
        x = torch.randn(32, 8)
        if step == nan_at:
            x[0, 0] = math.nan
        loss = nn.functional.cross_entropy(model(x), (x[:, 0] > 0).long())
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    return w


def test_listener_reads_only_host_data(tmp_path, monkeypatch):
    w = _train(tmp_path, 60, nan_at=45, flush_every=1000)  # nothing flushed yet
    w.flush()  # the sync point: statistics reach the store here
    live = LiveDiagnosis(tmp_path)

    def no_device_reads(*args, **kwargs):
        raise AssertionError("live diagnosis read a tensor: that would be a host sync")
    for name in ("item", "cpu", "numpy", "tolist", "__array__", "to"):
        monkeypatch.setattr(torch.Tensor, name, no_device_reads)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        live(w, 0, 59, [])  # first flush: the listener reads what the store holds
    monkeypatch.undo()
    assert {f.code for f in live.findings} >= {"nonfinite_gradient", "input_outlier"}
    w.close()


def test_each_finding_reported_once_across_flushes_and_stored(tmp_path):
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = _train(tmp_path, 120, nan_at=30, flush_every=10, on_finding=got.append)
        w.close()
    codes = [f.code for f in got]
    assert codes.count("nonfinite_gradient") == 1 and "input_outlier" in codes
    assert got[codes.index("nonfinite_gradient")].first_step == 30
    assert sum(issubclass(c.category, FindingWarning) for c in caught) == len(got)
    with gd.open_run(tmp_path) as run:
        events = run.events("finding")
    assert [e["data"]["code"] for e in events] == codes
    assert Finding.from_dict(events[0]["data"]) == got[0]


def test_live_diagnosis_can_be_turned_off(tmp_path):
    w = _train(tmp_path, 60, nan_at=20, flush_every=10, live_diagnosis=False)
    w.close()
    assert w.live is None
    with gd.open_run(tmp_path) as run:
        assert run.events("finding") == []


def test_episodic_codes_are_reported_again_only_after_a_quiet_stretch():
    live = LiveDiagnosis("unused")

    def f(code, first, last):
        return Finding(code, "warning", first, last, (), {}, "unknown", "")
    assert live.new_findings([f("loss_spike", 10, 10), f("vanishing_gradient", 0, 40)]) != []
    assert live.new_findings([f("loss_spike", 10, 40), f("vanishing_gradient", 0, 400)]) == []
    again = live.new_findings([f("loss_spike", 10, 200)])
    assert [x.last_step for x in again] == [200]


def test_errors_in_the_users_callback_are_not_swallowed(tmp_path):
    def broken(_finding):
        raise RuntimeError("user callback bug")
    with pytest.raises(RuntimeError, match="user callback bug"):
        _train(tmp_path, 40, nan_at=5, flush_every=10, on_finding=broken)


class _AttnLstmLM(nn.Module):
    """Embedding -> one encoder layer (attention) -> LSTM -> LM head: every model-sized series at once."""

    def __init__(self, vocab=16, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        h, _ = self.lstm(self.enc(self.emb(ids)))
        return self.lm_head(h)


def test_live_diagnosis_sees_what_the_final_diagnose_reads(tmp_path):
    """The window live diagnosis judges holds the same structure, attention, log Z and through-time series as
    the store that the final diagnose reads (a run shorter than the window: all of it)."""
    from graddoctor.diagnosis._data import RunData
    from graddoctor.store._run import Run

    torch.manual_seed(0)
    model = _AttnLstmLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 16, (4, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, opt, tmp_path, flush_every=5, activation_every=3)
        for _ in range(15):
            loss = nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 16), ids[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
        w.close()
    live = w.live._data()
    with Run(tmp_path) as run:
        final = RunData.from_run(run)
    assert final.structure is not None and live.structure == final.structure
    assert len(final.attn_steps) and len(final.logz_steps) and len(final.time_steps), "premise: all three recorded"
    for steps, values in (("attn_steps", "attn"), ("logz_steps", "logz"), ("time_steps", "time_grad")):
        assert (getattr(live, steps) == getattr(final, steps)).all(), steps
        assert getattr(live, values).shape == getattr(final, values).shape, values
        assert ((getattr(live, values) == getattr(final, values)) | (getattr(final, values) != getattr(final, values))).all()
    assert live.attn_modules == final.attn_modules and live.time_modules == final.time_modules
