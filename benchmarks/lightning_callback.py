"""Per-step cost of GradDoctorCallback in a Lightning fit, against the bare Lightning step.

Variants, each a fresh `L.Trainer.fit` of the same model and data (fits interleaved: every repeat
runs each variant once, in rotating order):
  bare                  Lightning alone (gradient_clip_val=1.0, no logger, no progress bar)
  bare (A/A control)    the same again: the spread between the two is the noise
  +GradDoctorCallback   + GradDoctorCallback(run_dir) with watch's defaults (activation stats included)

A step is timed from on_train_batch_start to on_train_batch_end (forward, backward, the callback's
watch.step before clipping, clipping, the optimizer step; its flushes every 50 steps included), by a
timing callback placed first. The first --warmup steps of each fit are dropped; the figure is the
median of each fit's median, over the repeats. Under a loaded machine the step times of whole fits
drift, so the time spent inside the callback's own hooks (on_before_backward, on_before_optimizer_step
with watch.step and its flushes, measured around them in the same fits) is reported too: its median per
step, and that as a share of the bare step.

Workload: overhead.py's MLP (16 x Linear(512) + ReLU, batch 256, Adam), cross-entropy on fixed data.

Usage: python benchmarks/lightning_callback.py [--steps 60] [--warmup 10] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from overhead import make_model  # the same workload (benchmarks/ is the script's folder)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import graddoctor as gd
from graddoctor.integrations.lightning import GradDoctorCallback

VARIANTS = ("bare", "bare (A/A control)", "+GradDoctorCallback")


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = make_model(16, 512, "cpu")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


class TimedCallback(GradDoctorCallback):
    """GradDoctorCallback with the time spent in its per-step hooks summed per step."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.hook_times: list[float] = []
        self._in_step = 0.0

    def on_before_backward(self, trainer, pl_module, loss):
        t0 = time.perf_counter()
        super().on_before_backward(trainer, pl_module, loss)
        self._in_step += time.perf_counter() - t0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        t0 = time.perf_counter()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.hook_times.append(self._in_step + time.perf_counter() - t0)
        self._in_step = 0.0


def fit_once(variant: str, loader: DataLoader, steps: int, run_dir: str) -> tuple[list[float], list[float]]:
    timer = StepTimer()
    callbacks: list[Callback] = [timer]
    ours = TimedCallback(run_dir) if variant == "+GradDoctorCallback" else None
    if ours is not None:
        callbacks.append(ours)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
                        gradient_clip_val=1.0, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=run_dir)
    trainer.fit(Module(), loader)
    return timer.times, ours.hook_times if ours is not None else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # Lightning's data loader hints and live findings are not the point here
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256 * 8, 512, generator=g), torch.randint(0, 10, (256 * 8,), generator=g))
    loader = DataLoader(data, batch_size=256, shuffle=False)
    per_fit: dict[str, list[float]] = {v: [] for v in VARIANTS}
    hooks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for v in order:
                times, hook_times = fit_once(v, loader, args.steps, f"{tmp}/{r}-{VARIANTS.index(v)}")
                per_fit[v].append(statistics.median(times[args.warmup:]))
                hooks += hook_times[args.warmup:]
    med = {v: statistics.median(t) * 1e3 for v, t in per_fit.items()}
    spread = {v: (min(t) * 1e3, max(t) * 1e3) for v, t in per_fit.items()}
    print(f"lightning={L.__version__} torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps} "
          f"(first {args.warmup} of each fit dropped) repeats={args.repeats}; {gd.native_status()}")
    # Load from other processes only ever slows a fit down, so the least-disturbed fit (the minimum of the fit
    # medians) is the second estimate: on a shared box it moves less than the median does.
    print("| variant | median step (ms) | fit medians min-max (ms) | ratio to bare (medians) "
          "| ratio to bare (minima) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for v in VARIANTS:
        print(f"| {v} | {med[v]:.2f} | {spread[v][0]:.2f}-{spread[v][1]:.2f} | {med[v] / med['bare']:.3f} "
              f"| {spread[v][0] / spread['bare'][0]:.3f} |")
    hook = statistics.median(hooks) * 1e3
    print(f"time in the callback's hooks: median {hook:.2f} ms per step, {hook / med['bare'] * 100:.1f}% of the bare "
          f"step; mean {statistics.fmean(hooks) * 1e3:.2f} ms (flush steps included)")


if __name__ == "__main__":
    main()
