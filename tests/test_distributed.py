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
from _numerics import U32, compose, gamma, norm_rel, rel_diff_tol, sqrt_rel, total_norm_rel
from graddoctor.store import _nonfinite_json

pytestmark = pytest.mark.slow  # every test starts 2 worker processes

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


# Roundings one sample's term of a gradient entry goes through before the batch sum, counted generously:
# the forward dot products (fan-in 6, 16, 16), the backward ones (fan-out 16, 16, 2), and the
# elementwise steps (bias adds, tanh, relu and their derivatives, the loss's difference, square, mean).
PER_SAMPLE_ROUNDINGS = 6 + 16 + 16 + 16 + 16 + 2 + 16
LR = 0.05


def single_process(run_dir):
    """The same model and global batches in one process (the oracle).

    Returns, per series, per step (and tensor), a first-order bound on how far a distributed run's
    record may be from this one. The ranks sum 4 samples each and the all-reduce (or reduce-scatter)
    adds and halves the 2 sums; here 8 samples are summed: each gradient entry sum_r term_r is within
    gamma_K sum_r |term_r| of the exact one either way (K = 8 + 2 + PER_SAMPLE_ROUNDINGS), so the two
    differ by dg <= 2 gamma_K sum_r |term_r|, the per-sample spread measured here. A norm is measured
    whole or from 2 shards (squares, a sum, a sqrt: 3 more roundings), either within `side`. SGD moves
    the weights apart by lr dg per step (and each side rounds w - lr g once); the feedback of that drift
    into later gradients is second order over 5 small steps and left out.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(STEPS)]
    opt = torch.optim.SGD(params, lr=LR)
    k = 8 + 2 + PER_SAMPLE_ROUNDINGS
    side = [compose(norm_rel(p.numel()), sqrt_rel(gamma(3)), U32) for p in params]
    t_side = total_norm_rel(max(side), len(params))
    bounds = {name: [] for name in ("grad_norm", "grad_maxabs", "grad_total_norm", "weight_norm", "update_norm")}
    drift = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    with gd.watch(model, opt, run_dir, flush_every=3, activation_every=0) as w:
        for x, y in batches:
            spread = [torch.zeros_like(p, dtype=torch.float64) for p in params]
            for r in range(len(x)):  # sample r's share of the mean-squared-error gradient, in absolute value
                share = (model(x[r:r + 1]) - y[r:r + 1]).pow(2).sum() / y.numel()
                for acc, t in zip(spread, torch.autograd.grad(share, params)):
                    acc += t.double().abs()
            loss = (model(x) - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            grad, wt = [p.grad.double() for p in params], [p.detach().double() for p in params]
            dg = [2 * gamma(k) * a for a in spread]
            norm = lambda t: float(torch.linalg.vector_norm(t))  # noqa: E731
            bounds["grad_norm"].append([norm(d) + 2 * e * norm(gr) for d, e, gr in zip(dg, side, grad)])
            bounds["grad_maxabs"].append([float(d.max()) for d in dg])  # a maximum adds no rounding
            total = norm(torch.cat([gr.flatten() for gr in grad]))
            bounds["grad_total_norm"].append(norm(torch.cat([d.flatten() for d in dg])) + 2 * t_side * total)
            bounds["weight_norm"].append([norm(d) + 2 * e * norm(v) for d, e, v in zip(drift, side, wt)])
            # the update is the float32 difference of two weight snapshots: within u (|w| + lr |g|) twice
            bounds["update_norm"].append([LR * norm(d) + 2 * (e * LR * norm(gr) + 2 * U32 * (norm(v) + LR * norm(gr)))
                                          for d, e, gr, v in zip(dg, side, grad, wt)])
            drift = [d0 + LR * d + 2 * U32 * (v.abs() + LR * gr.abs()) for d0, d, v, gr in zip(drift, dg, wt, grad)]
            w.step(loss)
            opt.step()
    return {name: np.array(b) for name, b in bounds.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    bounds = single_process(d)
    return gd.open_run(d), bounds


def assert_same_stats(run, reference):
    ref, bounds = reference
    assert run.tensors == ref.tensors
    for series in ("grad_norm", "grad_maxabs", "grad_total_norm", "weight_norm", "update_norm"):
        steps, data = run.series(series)
        ref_steps, ref_data = ref.series(series)
        assert steps.tolist() == ref_steps.tolist(), series
        err = np.abs(data.astype(np.float64) - ref_data)
        assert (err <= bounds[series][steps]).all(), (series, np.max(err / bounds[series][steps]))
    np.testing.assert_array_equal(run.series("grad_nonfinite")[1], ref.series("grad_nonfinite")[1])


def test_ddp_rank0_records_what_a_single_process_records(tmp_path, reference):
    launch("ddp", tmp_path)
    assert_same_stats(gd.open_run(tmp_path), reference)
    # rank 0's mirror got the recorded global norms (rank 1's stand-in logger was left alone)
    mirrored = _nonfinite_json.loads((tmp_path / "mirrored.json").read_text())
    steps, norm = gd.open_run(tmp_path).global_norm()
    assert {int(k): v for k, v in mirrored.items()} == {int(s): float(v) for s, v in zip(steps, norm)}


def test_fsdp2_sharded_gradients_are_combined_across_ranks(tmp_path, reference):
    launch("fsdp", tmp_path)
    assert_same_stats(gd.open_run(tmp_path), reference)


def test_dtensor_shards_combine_like_full_tensors(tmp_path):
    launch("dtensor", tmp_path)
    verdict = _nonfinite_json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["nonfinite"][0] == verdict["nonfinite"][1] == [1, 0, 1]
    # a norm from 2 shards (each a float32 norm, squared, summed across ranks, rooted: 3 more roundings)
    # against the whole tensor's float32 norm; the sizes are 40, 6 and 16 entries
    sizes = [40, 6, 16]
    rtol = [rel_diff_tol(compose(norm_rel(n // 2), sqrt_rel(gamma(3)), U32), norm_rel(n)) for n in sizes]
    np.testing.assert_allclose(verdict["norm"][0], verdict["norm"][1], rtol=max(rtol), atol=0)
    np.testing.assert_array_equal(verdict["maxabs"][0], verdict["maxabs"][1])  # the max of the shards' maxima: exact
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
    # the same gradients (unscaling by a power of 2 is exact) measured by watch (native kernel or PyTorch)
    # and by get_total_norm: each within the float32 bound of the exact total
    t_rel = total_norm_rel(norm_rel(16 * 16), 6)
    np.testing.assert_allclose(total[ok], logs[0][ok, 2], rtol=rel_diff_tol(t_rel, t_rel), atol=0)
