"""Guard under DDP (gloo, 2 CPU processes): every rank clips and skips alike, as one process would."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from _numerics import adam_drift_atol, clip_coef_rel, compose, gamma, norm_rel, rel_diff_tol, total_norm_rel
from torch import nn

STEPS = 6
NAN_STEP = 2

WORKER = r'''
import os, sys
import torch, torch.distributed as dist
from torch import nn
import graddoctor as gd
rank, world, out = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1]
steps, nan_step = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=os.environ["RENDEZVOUS"], rank=rank, world_size=world)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.Adam(ddp.parameters(), lr=0.05)
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(steps)]
w = gd.watch(ddp, opt, out + "/run", guard=gd.chain(gd.skip_nonfinite(), gd.clip_norm(0.05)), activation_every=0)
for i, (x, y) in enumerate(batches):
    x, y = x.chunk(world)[rank].clone(), y.chunk(world)[rank]
    if i == nan_step and rank == 1:
        x[0, 0] = float("nan")  # only one rank sees the bad batch; the all-reduce spreads it
    loss = (ddp(x) - y).pow(2).mean()
    opt.zero_grad(); loss.backward(); w.step(loss); opt.step()
w.close()
torch.save([p.detach() for p in model.parameters()], f"{out}/rank{rank}.pt")
dist.destroy_process_group()
# no interpreter finalization: gloo's threads can abort it after the results are saved (see _dist_worker.py)
os._exit(0)
'''


# Roundings one sample's term of a gradient entry goes through before the batch sum, counted generously:
# the forward dot products (fan-in 6, then 16) and bias adds, tanh, the loss's difference, square and
# mean, the backward dot products (fan-out 2, then 16), tanh's derivative and the products with it.
PER_SAMPLE_ROUNDINGS = 6 + 16 + 2 + 16 + 12


def reference():
    """One process, full batches, clip_grad_norm_, the NaN step skipped by hand.

    Returns the weights and, per tensor, a first-order bound on how far the DDP run may be from them.
    DDP sums each rank's 4 samples, all-reduces the 2 sums and halves them; here 8 samples are summed.
    Either way a gradient entry sum_r term_r is within gamma_K sum_r |term_r| of the exact one
    (K = 8 samples + 2 for the all-reduce and the halving + PER_SAMPLE_ROUNDINGS), so the two differ by
    <= 2 gamma_K sum_r |term_r|: relative to the entry, that is the batch sum's cancellation
    (measured here from per-sample gradients) times 2 gamma_K. The clip coefficients then differ as
    their totals do (clip_coef_rel), and Adam turns the relative changes into a drift (adam_drift_atol).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=0.05)
    g = torch.Generator().manual_seed(1)
    k = 8 + 2 + PER_SAMPLE_ROUNDINGS
    t_rel = total_norm_rel(norm_rel(max(p.numel() for p in params)), len(params))
    fed, changes, weights = [], [], []
    for i in range(STEPS):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        if i == NAN_STEP:
            continue
        spread = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        for r in range(8):  # |term_r| summed: sample r's share of the mean-squared-error gradient
            share = (model(x[r:r + 1]) - y[r:r + 1]).pow(2).sum() / y.numel()
            for acc, t in zip(spread, torch.autograd.grad(share, params)):
                acc += t.double().abs()
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        grad = [p.grad.double() for p in params]
        dg = [2 * gamma(k) * a for a in spread]
        total = float(torch.linalg.vector_norm(torch.cat([gr.flatten() for gr in grad])))
        d_total = float(torch.linalg.vector_norm(torch.cat([d.flatten() for d in dg]))) / total
        coef = rel_diff_tol(clip_coef_rel(compose(d_total, t_rel)), clip_coef_rel(t_rel))
        weights.append([p.detach().double().abs() for p in params])
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        fed.append([p.grad.double().abs() for p in params])  # what Adam is fed, clipped
        c = min(1.0, 0.05 / (total + 1e-6))
        changes.append([c * d + coef * f for d, f in zip(dg, fed[-1])])
        opt.step()
    atol = [adam_drift_atol([f[j] for f in fed], [d[j] for d in changes], [w[j] for w in weights], 0.05)
            for j in range(len(params))]
    return [p.detach() for p in params], atol


@pytest.mark.slow
def test_ddp_ranks_clip_and_skip_alike(tmp_path):
    env = dict(os.environ, RENDEZVOUS=f"file://{tmp_path}/rendezvous", WORLD_SIZE="2")  # no port to race for
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(STEPS), str(NAN_STEP)],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1))  # identical on both ranks
    ref, atol = reference()
    for a, b, tol in zip(rank0, ref, atol):  # and what one process does (up to the sums' rounding)
        assert ((a - b).double().abs() <= tol).all()
    import graddoctor as gd
    run = gd.open_run(tmp_path / "run")
    assert [e["step"] for e in run.events("skipped_step")] == [NAN_STEP]
