"""`gd.doctor.lightning`: the doctor for a LightningModule and a LightningDataModule.

What runs: the module's own `configure_optimizers()` (one optimizer) and `training_step(batch, i)` (its loss),
on the datamodule's `train_dataloader()` (after `setup("fit")`), in the doctor's loop under `gd.watch`.

What does not run, and why: the `Trainer`. A trial applies its remedy between backward and the optimizer
step (a guard), to the optimizer's lr or a scheduler, or to the loss (a penalty); inside a Trainer those
belong to the Trainer's own loop, and changing them for each trial would mean rewriting the user's
Trainer factory. So Trainer features (precision plugins, gradient accumulation, strategies, the user's own
callbacks and schedulers from `configure_optimizers`) are not part of the trials: the prescription is for
the module and its data, trained plainly. `self.log` inside `training_step` warns once and does nothing
(Lightning's own behaviour without a Trainer).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .._errors import ConfigError
from ._prescription import Prescription


def _one_optimizer(conf: Any) -> torch.optim.Optimizer:
    """The optimizer of `configure_optimizers()`'s return value; refused when there are several."""
    if isinstance(conf, dict):
        conf = conf.get("optimizer")
    if isinstance(conf, (tuple, list)):
        opts = conf[0] if len(conf) == 2 and isinstance(conf[0], (tuple, list)) else conf
        opts = [o["optimizer"] if isinstance(o, dict) else o for o in opts]
        if len(opts) != 1:
            raise ConfigError(f"configure_optimizers() returned {len(opts)} optimizers: the doctor trains one")
        conf = opts[0]
    if not isinstance(conf, torch.optim.Optimizer):
        raise ConfigError(f"configure_optimizers() returned {type(conf).__name__}: the doctor needs one "
                          "torch.optim.Optimizer (alone, in a list, or under the key 'optimizer')")
    return conf


def _step_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    out = model.training_step(batch, 0)  # type: ignore[operator]
    loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(f"training_step returned {type(out).__name__}: the doctor needs the loss tensor "
                          "(or a dict with 'loss')")
    return loss


def lightning_doctor(module_factory: Callable[[], Any], datamodule: Any, steps: int = 200, *, top: int = 4,
                     max_trials: Optional[int] = None, budget_s: Optional[float] = None,
                     out: Optional[str | Path] = None, workers: Optional[int] = None, seed: int = 0,
                     progress: bool = True) -> Prescription:
    """The doctor for a LightningModule (see the module docstring for what runs and what does not).

    Args:
      module_factory: `module_factory() -> LightningModule`, a fresh module each call.
      datamodule: a `LightningDataModule` (its `train_dataloader()` gives the batches; `val_dataloader()`, when
        it has one, the held-out batches trials are ranked on).
      Others: as `gd.doctor`.
    """
    import lightning.pytorch as pl

    from ._doctor import _validate, examine

    if not callable(module_factory):
        raise ConfigError(f"module_factory={module_factory!r} is not allowed: give a callable returning a "
                          "LightningModule")
    if not isinstance(datamodule, pl.LightningDataModule):
        raise ConfigError(f"datamodule={type(datamodule).__name__} is not allowed: give a LightningDataModule")
    _validate(module_factory, datamodule.train_dataloader, _step_loss, steps, top, max_trials, budget_s, workers,
              seed)
    datamodule.setup("fit")

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        module = module_factory()
        if not isinstance(module, pl.LightningModule):
            raise ConfigError(f"module_factory() returned {type(module).__name__}: it must return a LightningModule")
        return module, _one_optimizer(module.configure_optimizers())

    holdout = None
    if type(datamodule).val_dataloader is not pl.LightningDataModule.val_dataloader:
        holdout = datamodule.val_dataloader
    with warnings.catch_warnings():  # self.log without a Trainer: Lightning warns on every call
        warnings.filterwarnings("ignore", message=".*self.log.*")
        return examine(build, datamodule.train_dataloader, _step_loss, steps, top=top, max_trials=max_trials,
                       budget_s=budget_s, holdout=holdout, out=out, workers=workers, seed=seed, progress=progress)
