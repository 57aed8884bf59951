"""PyTorch Lightning: `GradDoctorCallback`, graddoctor's watch wired into a `lightning.Trainer`.

    trainer = L.Trainer(callbacks=[GradDoctorCallback(run_dir="runs/exp1")])
    trainer.fit(model, loader)

Where in Lightning's step each thing happens (lightning/pytorch/plugins/precision/precision.py, amp.py):
- `on_before_backward(loss)` gets each micro-batch's loss, already divided by
  `accumulate_grad_batches` (loops/optimization/automatic.py), and under a GradScaler (16-mixed)
  already multiplied by the loss scale (amp.py scales it before the hook): summed here on the device,
  with the scale divided out, they make the step's mean training loss;
- `on_before_optimizer_step` runs once per optimizer step, after the closure (every micro-batch's
  backward, DDP's gradient all-reduce) and after 16-mixed's `scaler.unscale_`, and before
  `gradient_clip_val` clips: `watch.step(loss)` there records the raw, unscaled, unclipped gradients.

The callback is thin: it opens the watch, steps it and closes it (at the end of fit, and on an exception),
and does no monitoring work of its own. Every rank builds the watch; core watch records on rank 0 only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback
from torch import Tensor

from .._errors import ConfigError
from ..core._compose import watch as make_watch
from ..core._config import resolve_config
from ..core._params import unwrap_optimizer
from ..core._watch import Watch
from ..mirror import as_mirror, as_mirrors

# gd.watch arguments that are not WatchConfig fields; every other option is a WatchConfig field.
_WATCH_ARGS = ("guard", "on_finding")

# Strategies whose gradients in on_before_optimizer_step are not the model's gradients, with what to use instead.
_REFUSED_STRATEGIES = {
    "FSDPStrategy": "FSDPStrategy (FSDP1) holds each rank's shard of flattened parameters, so the gradient norms "
                    "seen in on_before_optimizer_step cover the local shard only (Lightning#17600); use "
                    "strategy=ModelParallelStrategy (FSDP2, fully_shard), whose DTensor gradient norms graddoctor "
                    "reduces across ranks, or DDP",
    "DeepSpeedStrategy": "DeepSpeedStrategy steps inside backward and keeps the gradients partitioned, so param.grad "
                         "is None in on_before_optimizer_step; use DDP or ModelParallelStrategy (FSDP2)",
}


class GradDoctorCallback(Callback):
    """Record gradient health of a Lightning fit: one step per optimizer step, pre-clip, with the step's loss.

    Args:
      run_dir: directory of the run store; None uses `<trainer.log_dir>/graddoctor` (the logger's version
        directory, or `default_root_dir` with no logger).
      mirror: extra mirrors for the per-flush summaries (a `torch.utils.tensorboard.SummaryWriter`, a W&B
        run, ...; see `graddoctor.mirror.as_mirror`), added to those of the Trainer's TensorBoard, W&B and
        MLflow loggers, which get `graddoctor/...` scalars at each flush.
      watch_options: `graddoctor.watch` options (`flush_every=`, `guard=`, `on_finding=`, any
        `WatchConfig` field, or `config=`), checked here, at construction.
    """

    def __init__(self, run_dir: Optional[str | os.PathLike] = None, *, mirror: Any = None,
                 **watch_options: Any) -> None:
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise ConfigError(f"run_dir={run_dir!r} is not allowed: use a directory path (str or Path), or None "
                              "for <trainer.log_dir>/graddoctor")
        self.run_dir: Optional[Path] = None if run_dir is None else Path(run_dir)
        self._mirrors = as_mirrors(mirror) if mirror is not None else []  # refused here, by name, if unknown
        self._watch_args = {k: watch_options.pop(k) for k in _WATCH_ARGS if k in watch_options}
        self.config = resolve_config(watch_options.pop("config", None), watch_options)  # checked now
        self.watch: Optional[Watch] = None
        self._loss: Optional[Tensor] = None  # the step's loss so far: a device tensor, never read on the host
        self._micro_batches = 0  # backward calls since the last optimizer step
        self._scaler: Any = None

    # --------------------------------------------------------------- fit start
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":  # refuse before anything trains, on every rank alike (no rank waits for another)
            refuse_unsupported_strategy(trainer.strategy)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # After strategy.setup: the optimizers exist and the model sits on its device (DDP-wrapped).
        self._close()  # a second fit on the same callback starts its own watch
        optimizer = only_optimizer(trainer.optimizers)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        run_dir = self.run_dir if self.run_dir is not None else default_run_dir(trainer)  # all ranks: it broadcasts
        self._loss, self._micro_batches = None, 0
        self.watch = make_watch(pl_module, optimizer, run_dir, config=self.config, scaler=self._scaler,
                                mirror=self._mirrors + logger_mirrors(trainer), **self._watch_args)

    # --------------------------------------------------------------- each step
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self.watch is None:
            return
        value = loss.detach()
        if self._scaler is not None and self._scaler.is_enabled():
            value = value / self._scaler._scale  # a power of two: exact; no sync (get_scale() would sync)
        self._loss = value if self._loss is None else self._loss + value
        self._micro_batches += 1

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        w = self.watch
        if w is None or unwrap_optimizer(optimizer) is not w.optimizer:
            return
        if self._loss is None:  # no backward this step (training_step returned None): no gradients to record
            return
        factor = mean_factor(trainer, pl_module, self._micro_batches)
        w.step(self._loss if factor == 1.0 else self._loss * factor)
        self._loss, self._micro_batches = None, 0

    # --------------------------------------------------------------- fit end
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()  # the steps recorded before the exception stay in the store, which is marked closed

    def _close(self) -> None:
        w, self.watch, self._loss, self._micro_batches = self.watch, None, None, 0
        if w is not None:
            w.close()


def mean_factor(trainer: Any, pl_module: Any, micro_batches: int) -> float:
    """What turns the sum of a step's `on_before_backward` losses into the mean of its micro-batch losses.

    Automatic optimization divides each loss by `accumulate_grad_batches`, also in an epoch's last, shorter
    accumulation (which the factor corrects); `manual_backward` passes the losses as they are.
    """
    divided_by = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
    return divided_by / max(micro_batches, 1)


def logger_mirrors(trainer: Any) -> list:
    """Mirrors for the Trainer's TensorBoard, W&B and MLflow loggers (others, e.g. CSVLogger, are skipped).

    Rank 0 only: it alone records, and a logger's `experiment` is a dummy on the other ranks.
    """
    if trainer.global_rank != 0:
        return []
    return [m for m in (as_mirror(lg, strict=False) for lg in trainer.loggers if lg is not None) if m is not None]


def refuse_unsupported_strategy(strategy: Any) -> None:
    """Raise ConfigError for a strategy whose gradients graddoctor cannot measure from a callback."""
    for cls in type(strategy).__mro__:
        if cls.__name__ in _REFUSED_STRATEGIES:
            raise ConfigError(f"GradDoctorCallback cannot watch strategy {type(strategy).__name__}: "
                              + _REFUSED_STRATEGIES[cls.__name__])


def only_optimizer(optimizers: list) -> Any:
    """The one optimizer of the fit; refuses none or several (watch follows one optimizer's steps)."""
    if len(optimizers) != 1:
        raise ConfigError(f"GradDoctorCallback watches a LightningModule trained by one optimizer; "
                          f"configure_optimizers returned {len(optimizers)}")
    return optimizers[0]


def default_run_dir(trainer: Any) -> Path:
    """`<trainer.log_dir>/graddoctor`: the logger's version directory, or default_root_dir without a logger.

    note: `trainer.log_dir` broadcasts from rank 0, so every rank must call this (on_fit_start does).
    """
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir is not None else trainer.default_root_dir) / "graddoctor"
