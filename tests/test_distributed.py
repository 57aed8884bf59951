"""Distributed recording with torch.distributed over gloo, 2 CPU processes.

The recorded statistics must equal a single-process run on the same global batch.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor import _nonfinite_json

WORKER = Path(__file__).with_name("_dist_worker.py")
STEPS = 5


def launch(mode, run_dir, world=2):
    env = dict(os.environ, RENDEZVOUS=f"file://{run_dir}/rendezvous", WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, str(WORKER), mode, str(run_dir), str(STEPS)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out


def single_process(run_dir):
    """The same model and global batches in one process (the oracle)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(STEPS)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gd.watch(model, opt, run_dir, flush_every=3, activation_every=0) as w:
        for x, y in batches:
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    single_process(d)
    return gd.open_run(d)


def assert_same_stats(run, ref):
    assert run.tensors == ref.tensors
    for series in ("grad_norm", "grad_maxabs", "grad_total_norm", "weight_norm", "update_norm"):
        steps, data = run.series(series)
        ref_steps, ref_data = ref.series(series)
        assert steps.tolist() == ref_steps.tolist(), series
        np.testing.assert_allclose(data, ref_data, rtol=2e-5, atol=1e-7, err_msg=series)
    np.testing.assert_array_equal(run.series("grad_nonfinite")[1], ref.series("grad_nonfinite")[1])


def test_ddp_rank0_records_what_a_single_process_records(tmp_path, reference):
    launch("ddp", tmp_path)
    assert_same_stats(gd.open_run(tmp_path), reference)


def test_fsdp2_sharded_gradients_are_combined_across_ranks(tmp_path, reference):
    launch("fsdp", tmp_path)
    assert_same_stats(gd.open_run(tmp_path), reference)


def test_dtensor_shards_combine_like_full_tensors(tmp_path):
    launch("dtensor", tmp_path)
    verdict = _nonfinite_json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["nonfinite"][0] == verdict["nonfinite"][1] == [1, 0, 1]
    np.testing.assert_allclose(verdict["norm"][0], verdict["norm"][1], rtol=1e-6)
    np.testing.assert_allclose(verdict["maxabs"][0], verdict["maxabs"][1], rtol=1e-6)
    assert np.isnan(verdict["total"][0]) and np.isnan(verdict["total"][1])


def test_ddp_with_a_grad_scaler_unscales_on_every_rank_and_rank0_records_the_scale(tmp_path):
    launch("ddp_amp", tmp_path)
    logs = [np.array(_nonfinite_json.loads((tmp_path / f"amp-rank{r}.json").read_text())) for r in range(2)]
    # DDP averages the gradients before the scaler checks them, so both ranks skip the same steps.
    np.testing.assert_array_equal(logs[0][:, :2], logs[1][:, :2])
    assert logs[0][:, 1].sum() >= 1, "premise: the scale of 2**18 overflows at first"
    with gd.open_run(tmp_path) as run:
        steps, amp = run.amp()
        _, total = run.global_norm()
    np.testing.assert_array_equal(amp, logs[0][:, :2])
    # The recorded norm is the true one (unscaled by watch before measuring), as the rank computed it by hand.
    ok = np.isfinite(logs[0][:, 2])
    assert ok.any() and not ok.all(), "premise: some steps overflow, some do not"
    np.testing.assert_array_equal(np.isfinite(total), ok)
    np.testing.assert_allclose(total[ok], logs[0][ok, 2], rtol=1e-5)
