"""`graddoctor.watch()`: the composition root.

`Watch` records statistics and knows nothing of what uses them. This function builds one and
wires in the things that do, so that watch never imports upward (each is imported here, lazily):
- the guard (`graddoctor.treat`), a gradient transform run on every step's statistics;
- live diagnosis (`graddoctor.diagnosis`), a flush listener that runs the rules on host data;
- the mirrors (`graddoctor.mirror`), a flush listener that writes a summary to TensorBoard, W&B, MLflow.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from .._errors import ConfigError
from ._config import WatchConfig, resolve_config
from ._params import rank, watched_parameters
from ._watch import Watch


def watch(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
          run_dir: Optional[str | Path] = None, *, config: Optional[WatchConfig] = None, guard: Any = None,
          on_finding: Optional[Callable] = None, scaler: Any = None, mirror: Any = None, **options: Any) -> Watch:
    """Start recording a model's gradient health into `run_dir`.

    Args:
      model: the module being trained (DDP- or torch.compile-wrapped is fine).
      optimizer: the optimizer (optional; recorded in the run's metadata, used by remedies).
      run_dir: directory of the run store; None computes statistics without recording them.
      config: a `WatchConfig`; or give its fields as keyword options, e.g. `flush_every=100`.
      guard: a gradient transform (e.g. `gd.chain(gd.skip_nonfinite(), gd.zclip())`) or a
        `graddoctor.treat.Guard`, applied in `step()` to the gradients, reusing the step's
        statistics; each intervention is recorded as an event (see `graddoctor.treat`).
      on_finding: called as `on_finding(finding)` once per new diagnosis finding, at the flush
        that first shows it (needs `live_diagnosis=True`, the default; see `graddoctor.diagnosis`).
      optimizer: may be Accelerate's `AcceleratedOptimizer` or Lightning's `LightningOptimizer`:
        watch hooks the optimizer inside.
      scaler: the `torch.amp.GradScaler` of a mixed-precision run (needs `optimizer`), or the
        `accelerate.Accelerator` that holds it. `step()` measures the true gradients (dividing the
        scale out of the statistics of still-scaled gradients, without touching them, so the loop's
        own `unscale_` or `clip_grad_norm_` still works; with a guard it unscales them first), and
        records each step's loss scale and whether the scaler found an overflow, so that diagnose
        tells the steps it skipped from real non-finite gradients.
      mirror: where to mirror a summary at each flush (never per step: no sync of its own), one object or a
        list: a `torch.utils.tensorboard.SummaryWriter`, a W&B run (`wandb.init(...)`), an `mlflow.ActiveRun`
        or `graddoctor.mirror.MLflowMirror(run_id)`, a Lightning `TensorBoardLogger`/`WandbLogger`/
        `MLFlowLogger`, or a `graddoctor.mirror.Mirror`. Per step: `graddoctor/grad_norm`, per block
        `graddoctor/grad_norm/<block>` (e.g. `transformer.h.3`), `graddoctor/update_ratio` (and per block, on
        sampled steps), `graddoctor/loss`, `graddoctor/nonfinite`; each new finding as text under
        `graddoctor/findings`. Needs `run_dir`; only the recording rank writes. A mirror whose backend fails
        is turned off with one warning and training goes on (see `graddoctor.mirror`).
    Returns:
      A `Watch`; call `.step(loss)` once per optimizer step and `.close()` at the end
      (or use it as a context manager).
    """
    config = resolve_config(config, options)
    built_guard = None
    if guard is not None:  # built before the Watch opens its store: a refused guard writes nothing
        from ..treat._guard import as_guard
        named = watched_parameters(model)
        built_guard = as_guard(guard, [p for _, p in named], [n for n, _ in named])
    mirrors = _mirrors(mirror, run_dir)  # also before the store opens: a refused mirror writes nothing
    w = Watch(model, optimizer, run_dir, config, guard=built_guard, scaler=scaler)
    mirror_listener = None
    if w.recording and mirrors:
        from ..mirror._listener import MirrorListener, chain_on_finding
        mirror_listener = MirrorListener.of_watch(w, mirrors)
        on_finding = chain_on_finding(mirror_listener, on_finding)
    if w.recording and config.live_diagnosis:
        from ..diagnosis._live import attach
        w.live = attach(w, on_finding)
    if mirror_listener is not None:  # after live diagnosis: a flush's findings are written with its rows
        w.add_flush_listener(mirror_listener)
    return w


def _mirrors(mirror: Any, run_dir: Optional[str | Path]) -> list:
    """The `Mirror`s of `watch(mirror=...)`; refused without a run_dir (mirrors are written at its flushes)."""
    if mirror is None or rank() != 0:
        # Only rank 0 records and writes; a logger's experiment on another rank may be a stand-in (Lightning's
        # rank-zero-only loggers), which must not be touched, let alone refused.
        return []
    from ..mirror._convert import as_mirrors
    mirrors = as_mirrors(mirror)
    if mirrors and run_dir is None:
        raise ConfigError("mirror= needs a run_dir: the mirrors are written at each flush of the run store "
                          "(got run_dir=None)")
    return mirrors
