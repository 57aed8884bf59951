"""Guard under DDP (gloo, 2 CPU processes): every rank clips and skips alike, as one process would."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
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
'''


def reference():
    """One process, full batches, clip_grad_norm_, the NaN step skipped by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)
        if i == NAN_STEP:
            continue
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    return [p.detach() for p in model.parameters()]


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
    for a, b in zip(rank0, reference()):  # and what one process does (up to all-reduce rounding)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    import graddoctor as gd
    run = gd.open_run(tmp_path / "run")
    assert [e["step"] for e in run.events("skipped_step")] == [NAN_STEP]
