"""TensorBoard: scalars with `add_scalar(tag, value, global_step=step)`, findings with `add_text`."""
from __future__ import annotations

from typing import Any

from ._base import Mirror


class TensorBoardMirror(Mirror):
    """Mirror to a `torch.utils.tensorboard.SummaryWriter` (or anything with its `add_scalar`,
    `add_text` and `flush`, e.g. tensorboardX's). NaN and Inf are written as they are; the event file
    keeps them and TensorBoard's scalar charts show them.

    Args:
      writer: the SummaryWriter; it stays yours (graddoctor flushes it after each of its flushes, never closes it).
    """

    def __init__(self, writer: Any):
        self.writer = writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        self.writer.flush()
