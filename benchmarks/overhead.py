"""Per-step cost of watch, alone and with a clipping guard, against a baseline and clip_grad_norm_.

The budgets on this workload (BENCHMARKS.md): watch every step <= 1.03x baseline; with default activation
sampling <= 1.05x; watch + guard(clip_norm) <= clip_grad_norm_ alone.

Workload (the budgets' CPU workload): an MLP of 16 Linear(512, 512) + ReLU layers, batch 256, Adam.
Variants, each on its own copy of the same model, stepped in turn (interleaved, rotating order):
  baseline              forward, backward, optimizer step
  clip_grad_norm        + torch.nn.utils.clip_grad_norm_(max_norm=1.0)
  watch                 + gd.watch, activation stats off, no guard (so the guard's own cost shows)
  watch(default)        + gd.watch with its defaults (activation sampling, live diagnosis), no guard
  watch+guard           + gd.watch(guard=gd.clip_norm(1.0)), activation stats off: the guard reuses
                          watch's total norm, so clipping costs one multiply pass per group (none on
                          a CPU step that does not clip: the coefficient is 1 and in host memory)
  watch(default)+guard  the same with watch's default activation sampling
--set picks which run together (default: watch); --control adds a second, identical clip_grad_norm_
variant (an A/A control: its ratio to the first is the run-to-run noise of this harness); --processes K
runs the set in K fresh processes one after another and prints each one's ratios and their median (a
process keeps its memory layout for all its steps, and clip_grad_norm_'s own cost differs by process
far more than inside one); --max-norm sets the clipping threshold of both
clip_grad_norm_ and the guard (at 1.0 this workload clips ~90% of steps; at 100, ~1%). The run
prints how many steps clip_grad_norm_ actually clipped, and whether the native kernel was used.

Usage: python benchmarks/overhead.py [--set watch|guard|all] [--max-norm 1.0] [--weight-every N] [--steps 200]
                                    [--control] [--processes K] [--device cpu|cuda]
Prints a markdown table of medians and ratios.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import graddoctor as gd


def make_model(depth: int, width: int, device: str) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Variant:
    def __init__(self, name: str, model: nn.Module, run_dir: str | None, watch_options: dict | None, clip: bool,
                 guard: bool = True, max_norm: float = 1.0):
        self.name, self.model, self.clip, self.max_norm = name, model, clip, max_norm
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.watch = None
        if watch_options is not None:
            self.watch = gd.watch(model, self.opt, run_dir, guard=gd.clip_norm(max_norm) if guard else None,
                                  **watch_options)
        self.times: list[float] = []
        self.clipped = 0  # steps on which clip_grad_norm_ scaled the gradients down

    def step(self, x: torch.Tensor, y: torch.Tensor, device: str, record: bool) -> None:
        sync(device)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.watch is not None:
            self.watch.step(loss)
        if self.clip:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.opt.step()
        sync(device)
        if record:
            self.times.append(time.perf_counter() - t0)
            if self.clip:  # read after timing: on an accelerator this would be a sync
                self.clipped += bool(norm > self.max_norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--set", choices=["watch", "guard", "all"], default="watch",
                    help="watch: baseline, clip_grad_norm_, watch, watch(default) (the watch budget); "
                         "guard: baseline, clip_grad_norm_, watch+guard, watch(default)+guard (the watch + clipping budget); all: the six")
    ap.add_argument("--weight-every", type=int, default=None,
                    help="watch's weight_every for every watch variant (default: watch's own default, 1). "
                         "the 3%% budget covers the gradient statistics; 10 puts the weight norms "
                         "on the update-norm samples' cadence")
    ap.add_argument("--max-norm", type=float, default=1.0,
                    help="max_norm of clip_grad_norm_ and of the guard's clip_norm (1.0: clips every step here; "
                         "100: never clips)")
    ap.add_argument("--control", action="store_true",
                    help="add a second clip_grad_norm_ variant, identical to the first: an A/A control whose "
                         "ratio to the first shows how far two equal variants differ in this harness")
    ap.add_argument("--processes", type=int, default=1,
                    help="run the set in this many fresh processes, one after another, and also print each "
                         "variant's ratios per process and their median (a process's memory layout stays with "
                         "it for all its steps, so one process is one sample of it)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's medians, for --processes
    args = ap.parse_args()
    if args.processes > 1:
        across_processes(args)
        return
    med, clipped = run_once(args)
    if args.json:
        print(json.dumps(med))
        return
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"model={args.depth}x{args.width} batch={args.batch} steps={args.steps} (after {args.warmup} warm-up)")
    print(f"weight_every={args.weight_every or 'default'} set={args.set} max_norm={args.max_norm}: clip_grad_norm_ "
          f"scaled the gradients on {clipped} of {args.steps} timed steps; {gd.native_status()}")
    print("| variant | median step (ms) | ratio to baseline | ratio to clip_grad_norm |")
    print("| --- | ---: | ---: | ---: |")
    for name, m in med.items():
        print(f"| {name} | {m * 1e3:.2f} | {m / med['baseline']:.3f} | {m / med['clip_grad_norm']:.3f} |")


def run_once(args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Step the set's variants in turn; their median step times (s), and how many steps clip_grad_norm_ clipped."""
    torch.manual_seed(0)
    base = make_model(args.depth, args.width, args.device)
    x = torch.randn(args.batch, args.width, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        m = args.max_norm
        extra = {} if args.weight_every is None else {"weight_every": args.weight_every}
        # Each set is what one issue's budget compares, and nothing more: every extra model copy
        # stepped in turn makes the others' memory colder, which no single training run sees.
        sets = {
            "watch": [Variant("baseline", copy.deepcopy(base), None, None, False),
                      Variant("clip_grad_norm", copy.deepcopy(base), None, None, True, max_norm=m),
                      Variant("watch", copy.deepcopy(base), f"{tmp}/w", dict(activation_every=0, **extra), False,
                              guard=False),
                      Variant("watch(default)", copy.deepcopy(base), f"{tmp}/d", dict(extra), False, guard=False)],
            "guard": [Variant("baseline", copy.deepcopy(base), None, None, False),
                      Variant("clip_grad_norm", copy.deepcopy(base), None, None, True, max_norm=m),
                      Variant("watch+guard", copy.deepcopy(base), f"{tmp}/a", dict(activation_every=0, **extra), False,
                              max_norm=m),
                      Variant("watch(default)+guard", copy.deepcopy(base), f"{tmp}/b", dict(extra), False, max_norm=m)],
        }
        variants = sets[args.set] if args.set != "all" else sets["watch"] + sets["guard"][2:]
        if args.control:
            variants.append(Variant("clip_grad_norm (A/A control)", copy.deepcopy(base), None, None, True, max_norm=m))
        for i in range(args.warmup + args.steps):
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            for v in order:
                v.step(x, y, args.device, record=i >= args.warmup)
        for v in variants:
            if v.watch is not None:
                v.watch.close()
    return {v.name: statistics.median(v.times) for v in variants}, variants[1].clipped


def across_processes(args: argparse.Namespace) -> None:
    """Run the set in `args.processes` fresh processes; print each one's ratios to clip_grad_norm_ and their median."""
    # The same options for each process; the last --processes given wins, so each runs once.
    command = [sys.executable, __file__, *sys.argv[1:], "--processes", "1", "--json"]
    runs = []
    for k in range(args.processes):
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"process {k + 1} of {args.processes} done", file=sys.stderr, flush=True)
    names = list(runs[0])
    print(f"set={args.set} weight_every={args.weight_every or 'default'} max_norm={args.max_norm} steps={args.steps} "
          f"processes={args.processes}; {gd.native_status()}")
    print("| variant | " + " | ".join(f"process {k + 1}" for k in range(len(runs))) + " | median |")
    print("| --- |" + " ---: |" * (len(runs) + 1))
    rows = [(name, "clip_grad_norm") for name in names[2:]] + [(name, "baseline") for name in names[1:]]
    for name, against in rows:  # names[0:2] are baseline and clip_grad_norm themselves
        ratios = [r[name] / r[against] for r in runs]
        print(f"| {name} / {against} | " + " | ".join(f"{q:.3f}" for q in ratios)
              + f" | {statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
