"""A Lightning DDP or FSDP2 fit over gloo on the CPU, 2 processes, for test_integration_lightning.py.

Modes: `ddp` (strategy="ddp"); `fsdp2` (ModelParallelStrategy with data_parallel_size=2, the module
sharded by fully_shard in configure_model: DTensor parameters and gradients).

Started twice by the test, as torchrun would start it: `python _lightning_ddp_worker.py OUT_DIR MODES` (e.g. `ddp,fsdp2`) with
LOCAL_RANK (0, 1), WORLD_SIZE=2, NODE_RANK, MASTER_ADDR and MASTER_PORT set, so Lightning's `ddp` strategy
joins the two processes instead of launching any. For each mode every rank writes `OUT_DIR/<mode>/rank<r>.json`: its pre-clip gradient norms (taken in
on_before_optimizer_step, after DDP averaged the gradients), its optimizer step count, and whether its
watch records. The norms are of the full gradients (a sharded one is gathered
first with `full_tensor()`). GradDoctorCallback records into `OUT_DIR/<mode>/gd`.
"""
import json
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graddoctor.integrations.lightning import GradDoctorCallback

out, modes = Path(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
warnings.filterwarnings("ignore")


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.net(x) - y).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Sharded(Tiny):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class Oracle(Callback):
    """Placed after GradDoctorCallback in the list: its on_fit_start sees our watch; its
    on_before_optimizer_step runs after ours, which neither changes nor clips the gradients."""

    def __init__(self, ours):
        self.ours, self.pre, self.steps, self.recording = ours, [], 0, None

    def on_fit_start(self, trainer, pl_module):
        self.recording = self.ours.watch.recording
        trainer.optimizers[0].register_step_post_hook(self._count)

    def _count(self, *_):
        self.steps += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                 for p in pl_module.parameters() if p.grad is not None]
        self.pre.append(float(torch.nn.utils.get_total_norm(grads)))


def fit(mode: str, out: Path) -> None:
    """One fit under `mode`, recorded into out/gd; this rank's oracle goes to out/rank<r>.json."""
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 8, generator=g), 10 * torch.randn(32, 1, generator=g))
    ours = GradDoctorCallback(out / "gd", flush_every=3)
    oracle = Oracle(ours)
    if mode == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy
        strategy, module = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), Sharded()
    else:
        strategy, module = "ddp", Tiny()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, callbacks=[ours, oracle],
                        accumulate_grad_batches=2, gradient_clip_val=0.1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=out)
    # 32 samples over 2 ranks, batch 4: 4 batches per rank and epoch, 2 per optimizer step: 4 steps in 2 epochs
    trainer.fit(module, DataLoader(data, batch_size=4, shuffle=False))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        dict(pre=oracle.pre, steps=oracle.steps, global_step=trainer.global_step, recording=oracle.recording)))


# Several modes run one after the other in the same two processes (Lightning keeps the process group
# between fits), so the test pays for starting them and importing Lightning once.
for m in modes.split(","):
    fit(m, out / m)
# Leave without interpreter finalization: gloo's worker threads can still hold tensors there and abort
# with "terminate called without an active exception" after every result is on disk (the race
# tests/_dist_worker.py documents, pytorch/pytorch#179291; seen once in CI on the HF DDP worker).
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
