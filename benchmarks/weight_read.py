"""What the per-step weight read costs, and whether where it is made matters.

watch reads every weight once per step for the weight norms (weight_every=1, the default), which clip_grad_norm_
never does; this measures that read on its own, at each place in the step it could be made:

  none                    nothing (the bare step)
  grads                   the native gradient pass after backward (what watch reads with weight_every > 1)
  grads+weights           the same pass reading each weight beside its gradient (what watch does by default)
  weights after backward  a weight-norm pass after backward, before the optimizer step
  weights after optimizer a weight-norm pass right after the optimizer step
  weights before forward  a weight-norm pass before the forward
  weights in forward hooks   each Linear's weight and bias read by a forward pre-hook, right before
                          its matmul reads them too (so the matmul might find them in the cache)
  grads+weights in backward hooks  each parameter's gradient and weight read by a post-accumulate-grad
                          hook, as backward writes the gradient (both just touched, so in the cache)

One model (so one memory layout) steps through the variants, in a shuffled order each round, so
that no variant always follows the same one (a read right after another read of the same weights
finds them in the cache). Prints, per variant, medians of the pass, forward, backward and
optimizer step, and of the whole step with its ratio to `none`.

Usage: python benchmarks/weight_read.py [--rounds 250] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

from graddoctor.core import _native
from overhead import make_model  # the same workload (benchmarks/ is the script's folder)

VARIANTS = ("none", "grads", "grads+weights", "weights after backward", "weights after optimizer",
            "weights before forward", "weights in forward hooks", "grads+weights in backward hooks")
PARTS = ("pass", "forward", "backward", "optimizer", "step")


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def install_hooks(variant: str, model: nn.Module, params: list, spent: list[float]) -> list:
    """The hooks of the two hook variants (their handles); each adds its seconds to `spent`."""
    def read(fn) -> None:
        spent.append(timed(fn))
    if variant == "weights in forward hooks":
        return [m.register_forward_pre_hook(lambda m, _a: read(lambda: _native.norms([m.weight, m.bias])))
                for m in model.modules() if isinstance(m, nn.Linear)]
    if variant == "grads+weights in backward hooks":
        return [p.register_post_accumulate_grad_hook(lambda p: read(lambda: _native.grad_stats([p.grad], [p])))
                for p in params]
    return []


def step(variant: str, model: nn.Module, opt: torch.optim.Optimizer, params: list, x, y) -> dict[str, float]:
    """One training step with the variant's read; the seconds of each part (the hooks' own time
    is in `pass` and also inside forward or backward, which it is part of)."""
    weights = lambda: _native.norms(params)  # noqa: E731
    read = 0.0
    spent: list[float] = []
    handles = install_hooks(variant, model, params, spent)
    t0 = time.perf_counter()
    if variant == "weights before forward":
        read = timed(weights)
    t1 = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    loss.backward()
    t3 = time.perf_counter()
    grads = [p.grad for p in params]
    if variant == "grads":
        read = timed(lambda: _native.grad_stats(grads))
    elif variant == "grads+weights":
        read = timed(lambda: _native.grad_stats(grads, params))
    elif variant == "weights after backward":
        read = timed(weights)
    t4 = time.perf_counter()
    opt.step()
    t5 = time.perf_counter()
    if variant == "weights after optimizer":
        read = timed(weights)
    t6 = time.perf_counter()
    for h in handles:
        h.remove()
    read += sum(spent)
    return dict(zip(PARTS, (read, t2 - t1, t3 - t2, t5 - t4, t6 - t0)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=250, help="timed rounds (each steps every variant once)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, the batch and the shuffled order")
    args = ap.parse_args()
    _native.prepare()
    if _native.status().startswith("native kernel: unavailable"):
        raise SystemExit(_native.status())
    torch.manual_seed(args.seed)
    order = random.Random(args.seed)
    model = make_model(16, 512, "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    params = list(model.parameters())
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
    times: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PARTS} for v in VARIANTS}
    for r in range(args.warmup + args.rounds):
        for v in order.sample(VARIANTS, len(VARIANTS)):
            parts = step(v, model, opt, params, x, y)
            if r >= args.warmup:
                for p, s in parts.items():
                    times[v][p].append(s)
    med = {v: {p: statistics.median(s) * 1e3 for p, s in ps.items()} for v, ps in times.items()}
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} rounds={args.rounds}; {_native.status()}")
    print("| variant | the read (ms) | forward (ms) | backward (ms) | optimizer (ms) | step (ms) | step / none |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in VARIANTS:
        m = med[v]
        print(f"| {v} | " + " | ".join(f"{m[p]:.3f}" for p in PARTS) + f" | {m['step'] / med['none']['step']:.4f} |")


if __name__ == "__main__":
    main()
