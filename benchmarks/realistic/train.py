"""Train one run of the suite under `gd.watch`, as its user would write the loop.

NaN and Inf losses are recorded, never raised: a diverged run keeps stepping, as an unattended one does.
A marker file `suite_run.json` is written into the run directory when training has finished, so a later
call can tell a complete recording from an interrupted one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import graddoctor as gd

from .runs import RunSpec, Setup

MARKER = "suite_run.json"


def logits_of(out) -> torch.Tensor:
    """The logits of a forward's output: a tensor, HF's ModelOutput (`.logits`) or a (logits, hidden) tuple."""
    if isinstance(out, tuple):
        out = out[0]
    return out.logits if hasattr(out, "logits") else out


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def recorded(run_dir: Path) -> bool:
    return (run_dir / MARKER).is_file()


def train(spec: RunSpec, run_dir: Path) -> Path:
    """Train `spec` into `run_dir` (replacing whatever is there); returns run_dir.

    One intra-op thread: the models are tiny, and on a shared 2-core box a second thread only slows others."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup = spec.build(spec.seed)
        with gd.watch(setup.model, setup.opt, run_dir, **spec.watch) as w:
            losses = _LOOPS[spec.loop](setup, w, spec.steps)
    finally:
        torch.set_num_threads(threads)
    (run_dir / MARKER).write_text(json.dumps({"name": spec.name, "steps": spec.steps, "seed": spec.seed,
                                              "first_loss": losses[0], "last_loss": losses[-1]}))
    return run_dir


def _set_lr(setup: Setup, step: int) -> None:
    if setup.lr_at is not None:
        for g in setup.opt.param_groups:
            g["lr"] = setup.lr_at(step)


def _loop(setup: Setup, w: gd.Watch, steps: int, forward: Callable[[torch.Tensor], torch.Tensor],
          scaler: torch.amp.GradScaler | None = None) -> list[float]:
    """The user's loop: `forward` maps a batch's inputs to logits; with `scaler`, the loss is scaled for
    backward and the scaler steps the optimizer."""
    losses = []
    for step in range(steps):
        _set_lr(setup, step)
        x, y = setup.batches(step)
        loss = loss_of(forward(x), y)
        setup.opt.zero_grad()
        (loss if scaler is None else scaler.scale(loss)).backward()
        w.step(loss)
        if scaler is None:
            setup.opt.step()
        else:
            scaler.step(setup.opt)
            scaler.update()
        losses.append(float(loss))
    return losses


def _plain(setup: Setup, w: gd.Watch, steps: int) -> list[float]:
    return _loop(setup, w, steps, lambda x: logits_of(setup.model(x)))


def _bptt(setup: Setup, w: gd.Watch, steps: int) -> list[float]:
    """Truncated BPTT: the hidden state is carried from chunk to chunk and detached (the truncation)."""
    hidden = None

    def forward(x: torch.Tensor) -> torch.Tensor:
        nonlocal hidden
        out, hidden = setup.model(x, hidden)
        hidden = tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()
        return out
    return _loop(setup, w, steps, forward)


def _scaler(setup: Setup, w: gd.Watch, steps: int) -> list[float]:
    """Mixed-precision style: a GradScaler scales the loss, but watch was not given it (the mistake)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    return _loop(setup, w, steps, lambda x: logits_of(setup.model(x)), scaler)


_LOOPS = {"plain": _plain, "bptt": _bptt, "scaler": _scaler}
