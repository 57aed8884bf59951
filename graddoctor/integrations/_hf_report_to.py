"""The HF Trainer's `report_to`, as mirrors for `graddoctor.watch(mirror=...)`.

Called in the callback's `on_train_begin`, which runs after the reporting callbacks' own (the
Trainer puts them before user callbacks), so W&B's and MLflow's runs are active by then. The
TensorBoardCallback's SummaryWriter is not reachable from another callback: graddoctor opens its
own, and closes it at the end (see `ReportTo.close`).
"""
from __future__ import annotations

import os
from typing import Any


class ReportTo:
    """The mirror objects for the integrations in `args.report_to` that graddoctor mirrors to."""

    def __init__(self, args: Any):
        self.mirrors: list[Any] = []
        self._own_writer: Any = None
        wanted = set(args.report_to or [])
        if "tensorboard" in wanted:
            from torch.utils.tensorboard import SummaryWriter
            self._own_writer = SummaryWriter(log_dir=tensorboard_dir(args))
            self.mirrors.append(self._own_writer)
        if "wandb" in wanted:
            import wandb
            if wandb.run is not None:  # the WandbCallback starts it on the world process zero
                self.mirrors.append(wandb.run)
        if "mlflow" in wanted:
            import mlflow
            run = mlflow.active_run()  # the MLflowCallback starts it
            if run is not None:
                self.mirrors.append(run)

    def close(self) -> None:
        """Close the SummaryWriter graddoctor opened (after the watch's last flush wrote to it)."""
        if self._own_writer is not None:
            self._own_writer.close()
            self._own_writer = None


def tensorboard_dir(args: Any) -> str:
    """Where graddoctor's TensorBoard events go: `TENSORBOARD_LOGGING_DIR` when set (then beside the
    Trainer's own, one TensorBoard run), else `args.logging_dir` (transformers 4), else
    `<output_dir>/runs/graddoctor` (next to the Trainer's `<output_dir>/runs/<date>_<host>`, whose name
    another callback cannot know)."""
    return (os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
            or os.path.join(args.output_dir, "runs", "graddoctor"))
