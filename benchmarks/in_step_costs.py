"""What single pieces of watch's CPU step path cost inside a training step, not in a loop.

A piece of work timed in a tight loop runs with its code and data in cache. Inside a training
step it runs right after backward has streamed ~100 MB through the caches, and small things
cost 5-20x more there (a 3-microsecond tensor op takes tens). This script trains the benchmark
MLP (16 x Linear(512, 512) + ReLU, batch 256, Adam) and, after each backward, times one
candidate (they take turns, one per step), then reports medians. The same candidates are also
timed back to back in a loop, for comparison.

Candidates:
  noop                    an empty Python call (the floor of the timer)
  torch.empty             one small tensor allocation
  grad_stats(G)           the native gradient pass (norm, max-abs, counts, total)
  grad_stats(G) + norms(W)  the gradient pass, then a weight-norm pass
  grad_stats(G, W)        one pass reading each gradient beside its weight (what watch does)
  _foreach_mul_(G)        PyTorch's clipping multiply, after the gradient pass
  native scale_(G)        graddoctor's clipping multiply, after the gradient pass

Usage: python benchmarks/in_step_costs.py [--steps 700]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from graddoctor.core import _native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=700)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(16):
        layers += [nn.Linear(512, 512), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
    params = list(model.parameters())
    if _native.grad_stats([torch.ones(1)]) is None:
        raise SystemExit(f"the native kernel is needed here: {_native.status()}")
    coef = torch.tensor(0.999)

    def grads() -> list[torch.Tensor]:
        return [p.grad for p in params]

    candidates = {
        "noop": (lambda: None, False),
        "torch.empty((33, 6))": (lambda: torch.empty((33, 6), dtype=torch.float64), False),
        "grad_stats(G)": (lambda: _native.grad_stats(grads()), False),
        "grad_stats(G) + norms(W)": (lambda: (_native.grad_stats(grads()), _native.norms(params)), False),
        "grad_stats(G, W)": (lambda: _native.grad_stats(grads(), params), False),
        "_foreach_mul_(G), after the pass": (lambda: torch._foreach_mul_(grads(), coef), True),
        "native scale_(G), after the pass": (lambda: _native.scale_(grads(), 0.999), True),
    }
    names = list(candidates)
    in_step: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.steps):
        name = names[i % len(names)]
        fn, after_pass = candidates[name]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_pass:  # the multiply follows watch's gradient pass, as in a clipped step
            _native.grad_stats(grads(), params)
        t0 = time.perf_counter()
        fn()
        in_step[name].append(time.perf_counter() - t0)
        opt.step()
    in_loop: dict[str, float] = {}
    for name in names:  # the gradients of the last step stay; multiplying them by 0.999 is harmless
        fn, _ = candidates[name]
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        in_loop[name] = statistics.median(times)
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps}; {_native.status()}")
    print("| candidate | in a training step (us, median) | back to back in a loop (us, median) |")
    print("| --- | ---: | ---: |")
    for name in names:
        print(f"| {name} | {statistics.median(in_step[name][3:]) * 1e6:.1f} | {in_loop[name] * 1e6:.1f} |")


if __name__ == "__main__":
    main()
