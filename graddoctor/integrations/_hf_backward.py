"""Step a watch at the end of the last backward of an optimizer step: before the HF Trainer clips.

Why not a callback event: the Trainer clips the gradients (`max_grad_norm`, by
`accelerator.clip_grad_norm_`, which under fp16 also unscales them) right after the last
micro-batch's backward, and its first event after that backward, `on_pre_optimizer_step`, comes
after the clipping. The raw gradients exist only between the end of that backward and the
clipping, and no event fires there. So the watch is stepped from inside the backward's end:

1. A forward hook on the model sees each training forward (grad enabled, `model.training`). It
   keeps the output's loss for this optimizer step's loss, and registers a pre-hook on the
   loss's autograd node (or, for a model that returns no loss, on its first output that needs a
   gradient). A forward under `no_grad` (evaluation) builds no graph and is passed over.
2. When a backward reaches that node (at its start: the loss is the root's first input), the
   pre-hook queues a callback for the end of this backward on the autograd engine
   (`Variable._execution_engine.queue_callback`, as DDP does to finish its all-reduce).
   The node is the loss's, so the callback lands in the outer backward even when activation
   checkpointing runs nested backwards inside it.
3. That callback queues a second one. Final callbacks run in the order they were queued, and
   DDP queues its own (which waits for the all-reduce and writes the averaged gradients) while
   the backward runs, after our first: the second runs after DDP's, on the averaged gradients.
4. The second callback: if this backward was the optimizer step's last micro-batch (accelerate's
   `GradientState().sync_gradients`, which the Trainer sets before each micro-batch, also for the
   shorter last accumulation of an epoch), it calls `on_sync(loss)` with the step's loss.

Nothing here waits for the device: the loss stays a device tensor.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


class SyncBackwardHook:
    """Calls `on_sync(loss)` at the end of every backward for which `is_sync()` is True.

    `loss` is the step's loss as the HF Trainer logs it (a 0-d device tensor, or None when the
    model returns no loss): the micro-batches' losses summed when the Trainer had the model
    normalise them by the step's token count (the model was given `num_items_in_batch`), else
    their mean.
    """

    def __init__(self, model: nn.Module, is_sync: Callable[[], bool], on_sync: Callable[[Optional[Tensor]], None],
                 summed_scale: float = 1.0):
        """`summed_scale`: what the Trainer multiplies a token-normalised loss by (its process count when it
        averages tokens across processes: each process divides by the global token count)."""
        self._is_sync = is_sync
        self._summed_scale = summed_scale
        self._on_sync = on_sync
        self._queued = False  # a callback is queued for the end of the running backward
        self._losses: list[Tensor] = []  # this optimizer step's micro-batch losses, detached
        self._summed = False  # the model normalised each by the step's token count: sum them
        self._handle = model.register_forward_hook(self._on_forward, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not (torch.is_grad_enabled() and module.training):
            return
        loss = _loss_of(output)
        if loss is not None:
            self._losses.append(loss.detach())
            self._summed = kwargs.get("num_items_in_batch") is not None
        root = loss if loss is not None and loss.grad_fn is not None else _first_grad_output(output)
        if root is not None and root.grad_fn is not None:
            self._queued = False  # a new graph: a backward cut short by an error left no callback behind
            root.grad_fn.register_prehook(self._on_backward_start)

    def _on_backward_start(self, grad_outputs: Any) -> None:
        if not self._queued:  # once per backward, however many of our nodes it runs through
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_other_callbacks)

    def _after_other_callbacks(self) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._queued = False
        if not self._is_sync():
            return
        loss = self._step_loss()
        with torch.no_grad():
            self._on_sync(loss)

    def _step_loss(self) -> Optional[Tensor]:
        """The optimizer step's loss from the micro-batches' losses, which are then dropped. No host sync."""
        losses, self._losses = self._losses, []
        if not losses:
            return None
        stacked = torch.stack([x.float().mean() for x in losses])  # mean: a DataParallel loss has one per GPU
        return stacked.sum() * self._summed_scale if self._summed else stacked.mean()


def _loss_of(output: Any) -> Optional[Tensor]:
    """The loss in a model's output, where the HF Trainer's `compute_loss` takes it from."""
    if isinstance(output, Mapping):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0] if isinstance(output[0], Tensor) and output[0].numel() == 1 else None
    else:
        loss = None
    return loss if isinstance(loss, Tensor) else None


def _first_grad_output(output: Any) -> Optional[Tensor]:
    if isinstance(output, Mapping):
        values = list(output.values())
    else:
        values = list(output) if isinstance(output, (tuple, list)) else [output]
    return next((v for v in values if isinstance(v, Tensor) and v.grad_fn is not None), None)
