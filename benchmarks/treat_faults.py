"""Fault injection: NaN gradients on 1% of steps and 3 outlier batches (x1e4), unguarded vs guarded.

Task: sklearn digits (1797 x 64, no download; 1257 rows to train, 540 held out), MLP 64-128-128-10
with ReLU, Adam lr 1e-3, batch 64, 1000 steps. Every variant sees the same batches in the same order.
Faults (same steps in every faulty variant):
  - NaN gradients: on 10 steps (1%), one gradient entry of a random layer is set to NaN after backward;
  - outlier batches: at steps 300, 600 and 900 the inputs are multiplied by 1e4.
Variants:
  clean                  no faults, no guard (the reference)
  unguarded              faults, no guard
  skip_nonfinite         faults, gd.watch(guard=gd.skip_nonfinite()) (what zclip adds is the difference)
  skip_nonfinite+zclip   faults, gd.watch(guard=gd.chain(gd.skip_nonfinite(), gd.zclip()))
  skip_nonfinite+rollback faults, gd.watch(guard=gd.skip_nonfinite()) and gd.treat.rollback(every=20)
Measured: steps after which some weight was non-finite (checked after every optimizer step),
and the final loss on the held-out rows (and on the training rows), relative to the clean run.

Usage: python benchmarks/treat_faults.py [--steps 1000] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import graddoctor as gd


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def faults(steps: int, seed: int) -> tuple[set[int], set[int]]:
    g = torch.Generator().manual_seed(seed + 1)
    nan_steps = set(int(s) for s in torch.randperm(steps - 50, generator=g)[: steps // 100] + 50)
    outliers = {int(steps * 0.3), int(steps * 0.6), int(steps * 0.9)}
    return nan_steps - outliers, outliers


def run(variant: str, data: tuple, args, tmp: str) -> dict:
    x, y, x_test, y_test = data
    model = make_model(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    guard = {"skip_nonfinite+zclip": gd.chain(gd.skip_nonfinite(), gd.zclip()), "skip_nonfinite": gd.skip_nonfinite(),
             "skip_nonfinite+rollback": gd.skip_nonfinite()}.get(variant)
    w = gd.watch(model, opt, f"{tmp}/{variant}", guard=guard, flush_every=100) if guard is not None else None
    rb = gd.treat.rollback(model, opt, every=20, watch=w) if variant.endswith("rollback") else None
    nan_steps, outliers = faults(args.steps, args.seed) if variant != "clean" else (set(), set())
    g = torch.Generator().manual_seed(args.seed)
    bad_weight_steps, skipped_batches, t0 = 0, 0, time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        if rb is not None and rb.skipping():
            skipped_batches += 1
            continue
        xb = x[idx] * (1e4 if step in outliers else 1.0)
        loss = nn.functional.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        if step in nan_steps:
            p = list(model.parameters())[step % 6]
            p.grad.view(-1)[0] = math.nan
        if w is not None:
            w.step(loss)
        opt.step()
        if rb is not None:
            rb.step(loss)
        # note: a host sync per step, for the measurement only
        bad_weight_steps += int(not all(bool(torch.isfinite(q).all()) for q in model.parameters()))
    if w is not None:
        w.close()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(model(x_test), y_test))
        train = float(nn.functional.cross_entropy(model(x), y))
    return dict(final=final, train=train, bad=bad_weight_steps, seconds=time.perf_counter() - t0,
                skipped=w.guard.skipped_total if w is not None else 0,
                rollbacks=len(rb.rollbacks) if rb is not None else 0, dropped=skipped_batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(123))
    data = (x[perm[:1257]], y[perm[:1257]], x[perm[1257:]], y[perm[1257:]])
    nan_steps, outliers = faults(args.steps, args.seed)
    print(f"steps={args.steps} seed={args.seed} NaN-gradient steps={sorted(nan_steps)} outlier steps={sorted(outliers)}")
    print("| variant | held-out loss | vs clean | train loss | steps with non-finite weights | steps skipped | "
          "rollbacks (batches dropped) | time (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        clean = None
        for variant in ("clean", "unguarded", "skip_nonfinite", "skip_nonfinite+zclip", "skip_nonfinite+rollback"):
            r = run(variant, data, args, tmp)
            clean = clean if clean is not None else r["final"]
            rel = r["final"] / clean - 1 if math.isfinite(r["final"]) else math.nan
            print(f"| {variant} | {r['final']:.4f} | {rel:+.1%} | {r['train']:.4f} | {r['bad']} | {r['skipped']} | "
                  f"{r['rollbacks']} ({r['dropped']}) | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
