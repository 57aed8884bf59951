"""Per-step cost of watch on a GPT-2-shaped model (issue 18): time, peak memory and host syncs per variant.

Workload: Hugging Face's GPT2LMHeadModel built from a config (no download; GPT-2 small's shape on CUDA by
default: 12 layers, width 768, 12 heads, vocabulary 50257, 1024 tokens, batch 8), synthetic token ids,
bf16 autocast, AdamW (fused where this torch has it). Variants, each on its own copy of the same model,
stepped in turn (interleaved, rotating order, as benchmarks/overhead.py does):
  bare                     forward, backward, optimizer step
  bare (A/A control)       the same again: its ratio to bare is this harness's run-to-run noise
  clip_grad_norm_          + torch.nn.utils.clip_grad_norm_(max_norm)
  watch                    + gd.watch (activation statistics off, no guard; weight norms every step,
                             the default weight_every=1)
  watch, weight_every=10   the same with the weight norms every 10th step (the cost of reading the weights)
  watch + clip_norm guard  + gd.watch(guard=gd.clip_norm(max_norm))
  lightning grad_norm      + lightning.pytorch.utilities.grad_norm(model, 2), what Lightning's logging calls
                             (per-parameter `p.grad.norm(2)` and a total built through a host list)
For each: the median step time and its ratios to bare and to clip_grad_norm_; on CUDA the peak memory a
step allocates above what was allocated when it began (torch.cuda.max_memory_allocated), against bare's;
and the host syncs in a step, counted under torch.cuda.set_sync_debug_mode("warn") over --sync-steps extra
steps (none of them a watch flush: flush_every is set past them). On the CPU memory and syncs are n/a.

Usage: python benchmarks/gpu_overhead.py [--device cuda|cpu] [--steps 100] [--warmup 10] [--layers 12]
                                         [--width 768] [--heads 12] [--vocab 50257] [--seq 1024] [--batch 8]
--device cpu defaults to a tiny model (2 layers, width 64, vocabulary 256, 64 tokens, batch 4).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable, Optional

import torch

import graddoctor as gd

SIZES = {"cuda": dict(layers=12, width=768, heads=12, vocab=50257, seq=1024, batch=8),
         "cpu": dict(layers=2, width=64, heads=2, vocab=256, seq=64, batch=4)}


def make_model(args: argparse.Namespace) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=args.seq, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).to(args.device)


def make_optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, str]:
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), "fused"
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.AdamW(model.parameters(), lr=1e-4), "foreach"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Variant:
    def __init__(self, name: str, model: torch.nn.Module, device: str,
                 action: Optional[Callable[["Variant"], None]] = None, watch: Optional[dict] = None,
                 run_dir: Optional[str] = None):
        self.name, self.model, self.device, self.action = name, model, device, action
        self.opt, self.optimizer_kind = make_optimizer(model)
        self.watch = gd.watch(model, self.opt, run_dir, **watch) if watch is not None else None
        self.times: list[float] = []
        self.peaks: list[int] = []  # bytes a step allocated above what was allocated when it began
        self.syncs: list[int] = []

    def step(self, ids: torch.Tensor) -> None:
        with torch.autocast(self.device, dtype=torch.bfloat16):
            loss = self.model(ids, labels=ids).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.watch is not None:
            self.watch.step(loss)
        if self.action is not None:
            self.action(self)
        self.opt.step()

    def timed_step(self, ids: torch.Tensor, record: bool) -> None:
        cuda = self.device == "cuda"
        sync(self.device)
        if cuda:
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        self.step(ids)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)
            if cuda:
                self.peaks.append(torch.cuda.max_memory_allocated() - start)

    def counted_step(self, ids: torch.Tensor) -> None:
        """One untimed step under the sync debug mode; the syncs it warns about."""
        sync(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step(ids)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        self.syncs.append(sum("synchroniz" in str(w.message) for w in caught))


def clip(max_norm: float) -> Callable[[Variant], None]:
    return lambda v: torch.nn.utils.clip_grad_norm_(v.model.parameters(), max_norm)


def lightning_grad_norm() -> Callable[[Variant], None]:
    from lightning.pytorch.utilities import grad_norm  # imported here, before any timed step
    return lambda v: grad_norm(v.model, 2)


def build(args: argparse.Namespace, tmp: str) -> list[Variant]:
    torch.manual_seed(0)
    base = make_model(args)
    # flush (watch's one sync point) at close only, so that no timed or counted step holds one
    stats_only = dict(activation_every=0, flush_every=args.warmup + args.steps + args.sync_steps + 1)
    m = args.max_norm
    return [Variant("bare", copy.deepcopy(base), args.device),
            Variant("bare (A/A control)", copy.deepcopy(base), args.device),
            Variant("clip_grad_norm_", copy.deepcopy(base), args.device, clip(m)),
            Variant("watch", copy.deepcopy(base), args.device, watch=stats_only, run_dir=f"{tmp}/w"),
            Variant("watch, weight_every=10", copy.deepcopy(base), args.device,
                    watch=dict(stats_only, weight_every=10), run_dir=f"{tmp}/w10"),
            Variant("watch + clip_norm guard", copy.deepcopy(base), args.device,
                    watch=dict(stats_only, guard=gd.clip_norm(m)), run_dir=f"{tmp}/g"),
            Variant("lightning grad_norm", copy.deepcopy(base), args.device, lightning_grad_norm())]


def run(args: argparse.Namespace) -> list[Variant]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        variants = build(args, tmp)
        for i in range(args.warmup + args.steps):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                v.timed_step(ids, record=i >= args.warmup)
        if args.device == "cuda":
            for _ in range(args.sync_steps):
                for v in variants:
                    v.counted_step(ids)
        for v in variants:
            if v.watch is not None:
                v.watch.close()
    return variants


def table(variants: list[Variant]) -> str:
    med = {v.name: statistics.median(v.times) for v in variants}
    bare, clipped = med["bare"], med["clip_grad_norm_"]
    bare_peak = max(variants[0].peaks) if variants[0].peaks else None
    rows = ["| variant | median step (ms) | ratio to bare | ratio to clip_grad_norm_ | step peak above bare (MiB) "
            "| syncs per step |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for v in variants:
        peak = f"{(max(v.peaks) - bare_peak) / 2 ** 20:+.1f}" if bare_peak is not None else "n/a"
        syncs = f"{statistics.median(v.syncs):g}" if v.syncs else "n/a"
        rows.append(f"| {v.name} | {med[v.name] * 1e3:.2f} | {med[v.name] / bare:.3f} | {med[v.name] / clipped:.3f} "
                    f"| {peak} | {syncs} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first")
    ap.add_argument("--sync-steps", type=int, default=3, help="steps per variant counted for syncs (CUDA)")
    ap.add_argument("--max-norm", type=float, default=1.0, help="max_norm of clip_grad_norm_ and the guard")
    for name in ("layers", "width", "heads", "vocab", "seq", "batch"):
        ap.add_argument(f"--{name}", type=int, default=None, help="model size (default: by device, see above)")
    args = ap.parse_args()
    for name, value in SIZES[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    variants = run(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device={args.device} ({name}) torch={torch.__version__} threads={torch.get_num_threads()} "
          f"GPT-2 {args.layers} layers x {args.width} ({args.heads} heads), vocabulary {args.vocab}, "
          f"batch {args.batch} x {args.seq} tokens, bf16 autocast, AdamW {variants[0].optimizer_kind}; "
          f"steps={args.steps} after {args.warmup} warm-up; {gd.native_status()}")
    print(table(variants))


if __name__ == "__main__":
    main()
