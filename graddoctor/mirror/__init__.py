"""Mirrors: graddoctor's per-flush statistics and findings, written where users already look.

`graddoctor.watch(model, optimizer, run_dir, mirror=[writer, wandb_run, mlflow_run])` writes, at each
flush (never per step: no sync of its own), per step: the global and per-block gradient norms, the
update/weight ratios on sampled steps, the loss, a non-finite flag, and each new finding as text, under
`graddoctor/...` tags (see `_rows`). Blocks come from `graddoctor.core._blocks`.

`Mirror` is the interface (subclass it for another backend); `TensorBoardMirror`, `WandbMirror` and
`MLflowMirror` are its implementations, each importing its package only when built; `as_mirror` turns
a SummaryWriter, W&B run, MLflow run or Lightning logger into one.
"""
from ._base import Mirror
from ._convert import as_mirror, as_mirrors
from ._listener import MirrorListener
from ._mlflow import MLflowMirror
from ._rows import RowMaker
from ._tensorboard import TensorBoardMirror
from ._wandb import WandbMirror

__all__ = ["Mirror", "TensorBoardMirror", "WandbMirror", "MLflowMirror", "as_mirror", "as_mirrors",
           "MirrorListener", "RowMaker"]
