"""One rank of the distributed tests; started twice by test_distributed.py with RANK/WORLD_SIZE set.

mode ddp:   DDP over gloo, each rank half of the global batch; rank 0 records into run_dir.
mode fsdp:  FSDP2 (fully_shard, DTensor-sharded parameters and gradients); rank 0 records.
mode dtensor: tensor_stats on hand-made Shard(0) DTensors vs the full tensors; writes a JSON verdict.
mode ddp_amp: DDP + float16 autocast + GradScaler + a clip guard; each rank writes its scaler's log.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import graddoctor as gd
from graddoctor.mirror import Mirror
from graddoctor.store import _nonfinite_json

mode, run_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
# A file rendezvous: no TCP port to race for with other tests running at the same time.
dist.init_process_group("gloo", init_method=os.environ["RENDEZVOUS"], rank=rank, world_size=world)


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(steps)]
    return model, batches


def train(model, batches, shard, mirror=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = gd.watch(model, opt, run_dir, flush_every=3, activation_every=0, mirror=mirror)
    for x, y in batches:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        w.step(loss)
        opt.step()
    w.close()
    return w


class GlobalNormFile(Mirror):
    """Rank 0's mirror: the mirrored global norms, written to a JSON file at the end."""

    def __init__(self):
        self.rows = {}

    def scalars(self, step, values):
        self.rows[step] = values["graddoctor/grad_norm"]

    def text(self, step, tag, text):
        pass

    def flush(self):
        with open(os.path.join(run_dir, "mirrored.json"), "w") as f:
            f.write(_nonfinite_json.dumps(self.rows))


if mode == "ddp":
    model, batches = model_and_data()
    # Rank 0 mirrors; the other rank passes what a rank-zero-only logger gives it there (a stand-in, here an
    # object no mirror accepts): it must be left alone, not refused.
    w = train(nn.parallel.DistributedDataParallel(model), batches, shard=False,
              mirror=GlobalNormFile() if rank == 0 else object())
    assert w.recording == (rank == 0), "only rank 0 records"
    assert (w.latest is None) == (rank != 0), "other ranks do no monitoring work"
elif mode == "fsdp":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model, batches = model_and_data()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, batches, shard=True)
elif mode == "ddp_amp":
    # DDP + float16 autocast + GradScaler: every rank's watch unscales before measuring; rank 0
    # records. Each rank writes what its own scaler did, read through the public API.
    model, batches = model_and_data()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18)
    w = gd.watch(ddp, opt, run_dir, flush_every=3, activation_every=0, scaler=scaler, guard=gd.clip_norm(1.0))
    log = []
    for x, y in batches:
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        with torch.autocast("cpu", dtype=torch.float16):
            out = ddp(x)
        loss = (out.float() - y).pow(2).mean()
        opt.zero_grad()
        scaler.scale(loss).backward()
        taken = scaler.get_scale()
        # the true global norm, by hand: the scaled gradients' norm over the scale (Inf/NaN on an overflow)
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) / taken
        w.step(loss)
        scaler.step(opt)
        scaler.update()
        log.append([taken, float(scaler.get_scale() < taken), norm])
    w.close()
    with open(os.path.join(run_dir, f"amp-rank{rank}.json"), "w") as f:
        f.write(_nonfinite_json.dumps(log))
elif mode == "dtensor":
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    full = [torch.randn(8, 5), torch.randn(6), torch.randn(4, 4) * 100]
    full[0][5, 1] = float("nan")   # in rank 1's shard
    full[2][0, 0] = float("inf")   # in rank 0's shard
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    got = gd.tensor_stats(sharded, torch.device("cpu"))
    ref = gd.tensor_stats(full, torch.device("cpu"))
    verdict = {k: [getattr(got, k).tolist(), getattr(ref, k).tolist()] for k in ("norm", "maxabs", "nonfinite")}
    verdict["total"] = [float(got.total_norm), float(ref.total_norm)]
    if rank == 0:
        with open(os.path.join(run_dir, "verdict.json"), "w") as f:
            f.write(_nonfinite_json.dumps(verdict))
dist.barrier()
dist.destroy_process_group()
# Leave without interpreter finalization: there, objects still tied to gloo (the DTensors and the
# device mesh) are torn down after their process group, and about 1 run in 50 aborted with
# "terminate called without an active exception" after every result was written (measured on
# this worker; the same race as pytorch/pytorch#179291 describes). Results are on disk by now.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
