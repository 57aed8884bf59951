"""Per-step cost of watch(scaler=...) in a mixed-precision (float16 autocast + GradScaler) training step.

With a scaler, `w.step()` calls `scaler.unscale_(optimizer)` itself, which `scaler.step()` would
otherwise do, so that work only moves earlier; what watch adds is its statistics and the step's
`amp` row (the scale and the overflow flag, copied by one torch.cat). Variants, each on its
own copy of the same model, stepped in turn (interleaved, rotating order):
  amp                 autocast forward, scaler.scale(loss).backward(), scaler.step, scaler.update
  amp+watch(scaler)   + gd.watch(model, opt, run_dir, scaler=scaler), activation stats off
  amp+watch(unscale)  + the loop calling scaler.unscale_(opt) itself, then gd.watch without the scaler
                      (what the README said to do before `scaler=` existed: same work, no amp row)

Workload: overhead.py's MLP (16 x Linear(512) + ReLU, batch 256, Adam). --autocast picks the
forward's dtype: float16 (the default on cuda, the workload AMP is for), or none (the default on
cpu: this CPU has no float16 matmul, and a float16-autocast step takes ~1.3 s, which would hide
any cost; in float32 the GradScaler still scales, unscales, checks and steps exactly as under
float16, so what watch adds to it shows against overhead.py's 45 ms step).

Usage: python benchmarks/amp_cost.py [--steps 100] [--device cpu|cuda] [--autocast float16|bfloat16|none]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

import graddoctor as gd
from graddoctor.core._amp import overflowed
from overhead import make_model, sync  # the same workload (benchmarks/ is the script's folder)

VARIANTS = ("amp", "amp+watch(scaler)", "amp+watch(unscale)")


class Variant:
    def __init__(self, name: str, model: nn.Module, device: str, run_dir: str, autocast: str):
        self.name, self.model, self.device = name, model, device
        self.autocast = None if autocast == "none" else getattr(torch, autocast)
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(device)
        self.watch = None
        if name != "amp":
            scaler = self.scaler if name == "amp+watch(scaler)" else None
            self.watch = gd.watch(model, self.opt, run_dir, scaler=scaler, activation_every=0)
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device, dtype=self.autocast or torch.float16, enabled=self.autocast is not None):
            out = self.model(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.name == "amp+watch(unscale)":
            self.scaler.unscale_(self.opt)
        if self.watch is not None:
            self.watch.step(loss)
        self.scaler.step(self.opt)
        self.scaler.update()
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=["float16", "bfloat16", "none"], default=None,
                    help="the forward's autocast dtype (default: float16 on cuda, none on cpu)")
    args = ap.parse_args()
    autocast = args.autocast or ("float16" if args.device == "cuda" else "none")
    warnings.simplefilter("ignore")  # live findings on this untuned workload are not the point here
    torch.manual_seed(0)
    base = make_model(16, 512, args.device)
    x = torch.randn(256, 512, device=args.device)
    y = torch.randint(0, 10, (256,), device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        variants = [Variant(n, copy.deepcopy(base), args.device, f"{tmp}/{i}", autocast) for i, n in enumerate(VARIANTS)]
        for i in range(args.warmup + args.steps):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                v.step(x, y, record=i >= args.warmup)
        for v in variants:
            if v.watch is not None:
                v.watch.close()
        scaled = next(v for v in variants if v.name == "amp+watch(scaler)")
        with gd.open_run(scaled.watch.run_dir) as run:
            skipped = int(overflowed(run.amp()[1]).sum())
    med = {v.name: statistics.median(v.times) * 1e3 for v in variants}
    print(f"device={args.device} autocast={autocast} torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps} "
          f"(after {args.warmup} warm-up); GradScaler skipped {skipped} of {args.warmup + args.steps} steps of the "
          f"watched run; {gd.native_status()}")
    print("| variant | median step (ms) | ratio to amp |")
    print("| --- | ---: | ---: |")
    for name in VARIANTS:
        print(f"| {name} | {med[name]:.2f} | {med[name] / med['amp']:.3f} |")


if __name__ == "__main__":
    main()
