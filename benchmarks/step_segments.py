"""Where a training step's time goes: forward, backward, the work between backward and the optimizer
step, and the optimizer step, for the baseline, clip_grad_norm_, watch, and watch + guard(clip_norm).

overhead.py gives whole-step medians; this splits them, to see which part of the step a variant
makes slower (watch's input-batch hook runs in the forward; its statistics and the guard's clip run
between backward and the optimizer step). Same workload (16 x Linear(512) + ReLU, batch 256, Adam),
each variant on its own copy of the model, stepped in turn in rotating order.

With --pieces, watch + guard's own functions are also timed inside the step (perf_counter wrappers,
a few microseconds each): the gradient-and-weight pass, and the clip (coefficient and multiply).

Usage: python benchmarks/step_segments.py [--steps 500] [--max-norm 1.0] [--pieces]
"""
from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

import graddoctor as gd
from graddoctor.core import _watch
from graddoctor.treat import _transforms
from overhead import make_model  # the same workload (benchmarks/ is the script's folder)

SEGMENTS = ("forward", "backward", "between", "optimizer", "step")


# Pieces are timed only while the watch+guard variant steps (the watch variant calls some of them too).
TIMING = {"on": False}


def wrap_pieces(times: dict[str, list[float]]) -> None:
    """Time watch + guard's pieces wherever they are called (the module attributes the step looks up)."""
    def timed(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            if TIMING["on"]:
                times.setdefault(label, []).append(time.perf_counter() - t)
            return out
        setattr(owner, name, wrapper)

    timed(_watch.Watch, "step", "Watch.step (all of it, guard included)")
    timed(_watch, "grad_and_weight_stats", "gradient + weight pass")
    timed(_watch, "tensor_stats", "gradient pass (no weights)")
    timed(_transforms, "clip_by_total_norm_", "clip coefficient and multiply (one native call)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--pieces", action="store_true", help="also time watch + guard's pieces inside the step")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # live findings on this untuned workload are not the point here
    pieces: dict[str, list[float]] = {}
    if args.pieces:
        wrap_pieces(pieces)
    torch.manual_seed(0)
    base = make_model(16, 512, "cpu")
    x, y = torch.randn(256, 512), torch.randint(0, 10, (256,))
    variants = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("baseline", "clip_grad_norm", "watch", "watch+guard"):
            model = copy.deepcopy(base)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            w = None
            if name.startswith("watch"):
                guard = gd.clip_norm(args.max_norm) if name == "watch+guard" else None
                w = gd.watch(model, opt, f"{tmp}/{name}", guard=guard, activation_every=0)
            variants.append((name, model, opt, w, {k: [] for k in SEGMENTS}))
        for i in range(args.warmup + args.steps):
            k = i % len(variants)
            for name, model, opt, w, times in variants[k:] + variants[:k]:
                TIMING["on"] = name == "watch+guard" and i >= args.warmup
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                if name == "clip_grad_norm":
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
                elif w is not None:
                    w.step(loss)
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                TIMING["on"] = False
                if i >= args.warmup:
                    for key, v in zip(SEGMENTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                        times[key].append(v)
        for _, _, _, w, _ in variants:
            if w is not None:
                w.close()
    print(f"torch={torch.__version__} threads={torch.get_num_threads()} steps={args.steps} max_norm={args.max_norm}; "
          f"{gd.native_status()}")
    print("| variant | forward (ms) | backward (ms) | between backward and optimizer (ms) | optimizer (ms) | step (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, _, _, _, times in variants:
        print(f"| {name} | " + " | ".join(f"{statistics.median(times[k]) * 1e3:.3f}" for k in SEGMENTS) + " |")
    if pieces:
        print("\n| piece of watch + guard's step | median inside the step (us) | calls |")
        print("| --- | ---: | ---: |")
        for label, v in pieces.items():
            print(f"| {label} | {statistics.median(v) * 1e6:.0f} | {len(v)} |")


if __name__ == "__main__":
    main()
