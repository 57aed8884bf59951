"""One rank of test_integration_transformers' DDP test; started twice with RANK/WORLD_SIZE/RENDEZVOUS set.

The HF callback's end-of-backward step (`SyncBackwardHook`) under DDP over gloo: the gradients it
sees must be the all-reduced ones DDP leaves in `.grad` after backward, not the rank's own. Prints
one JSON line: whether they equal the averaged gradients, and whether they differ from the local ones.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from graddoctor.integrations._hf_backward import SyncBackwardHook

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=os.environ["RENDEZVOUS"], rank=rank, world_size=world)


class LossModel(nn.Module):
    """Returns its loss as HF models do, in a dict."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):
        return {"loss": self.b(torch.tanh(self.a(x))).pow(2).mean()}


torch.manual_seed(0)
model = LossModel()
ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1e-6)  # one bucket per tensor: several all-reduces
seen = []
hook = SyncBackwardHook(model, is_sync=lambda: True, on_sync=lambda loss: seen.append(
    [p.grad.clone() for p in model.parameters()]))
x = torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)) + 10 * rank  # ranks differ
ddp(x)["loss"].backward()
averaged = [p.grad.clone() for p in model.parameters()]
hook.remove()
local = torch.autograd.grad(model(x)["loss"], list(model.parameters()))
print(json.dumps({"steps": len(seen),
                  "equal_averaged": all(torch.equal(s, a) for s, a in zip(seen[0], averaged)),
                  "differ_local": any(not torch.allclose(s, g) for s, g in zip(seen[0], local))}))
dist.destroy_process_group()
# Leave without interpreter finalization: gloo's worker threads can still hold tensors there and abort
# with "terminate called without an active exception" after every result is out (seen once in ~5 CI runs
# of this worker; the race tests/_dist_worker.py documents, pytorch/pytorch#179291).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
