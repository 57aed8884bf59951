"""The Hugging Face Trainer callback: `Trainer(..., callbacks=[GradDoctorCallback(run_dir=...)])`.

It records one step per optimizer step (with gradient accumulation) with the raw gradients:
before the Trainer's `max_grad_norm` clipping and, under fp16, with the loss scale divided out of
the statistics (the gradients are left scaled for the Trainer's own unscale). The Trainer gives
callbacks no event between the last backward and the clipping, so the step is taken at the end of
that backward (see `_hf_backward`). Only the world process zero writes (core watch does this).

Imports transformers and accelerate: import this module only where they are installed
(`pip install 'graddoctor[transformers]'`).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

from torch import Tensor, nn
from transformers import TrainerCallback

from .._errors import ConfigError
from ..core._compose import watch
from ..core._config import resolve_config
from ..core._watch import Watch
from ._hf_backward import SyncBackwardHook
from ._hf_report_to import ReportTo

_WATCH_KEYWORDS = ("config", "guard", "on_finding", "mirror")  # gd.watch's keywords that are not WatchConfig fields


class GradDoctorCallback(TrainerCallback):
    """Watch the gradient health of a `transformers.Trainer` run.

    Args:
      run_dir: the run directory; None: `<args.logging_dir or args.output_dir>/graddoctor`.
      **watch_options: what `graddoctor.watch` takes besides the model, optimizer, run directory
        and scaler: `WatchConfig` fields (`flush_every=...`), `config=`, `guard=`, `on_finding=`,
        `mirror=`. Without `mirror=`, the run is mirrored to what `args.report_to` names among
        "tensorboard", "wandb" and "mlflow" (see `_hf_report_to`); with it, to exactly those given.
    """

    def __init__(self, run_dir: Optional[str | Path] = None, **watch_options: Any):
        config_options = {k: v for k, v in watch_options.items() if k not in _WATCH_KEYWORDS}
        resolve_config(watch_options.get("config"), config_options)  # refused here, not at the start of training
        self.run_dir = run_dir
        self.watch_options = watch_options
        self.watch: Optional[Watch] = None
        self._hook: Optional[SyncBackwardHook] = None
        self._report_to: Optional[ReportTo] = None
        self._stepped = False  # the watch recorded the optimizer step now under way
        self._warned_missed = False
        self._warned_twice = False

    # ------------------------------------------------------------ Trainer events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Optional[nn.Module] = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        self.close()  # a previous train() that raised left its watch open
        reason = hidden_gradients(args)
        if reason is not None:
            warnings.warn(f"graddoctor: GradDoctorCallback records nothing in this run: {reason}", RuntimeWarning,
                          stacklevel=2)
            return
        if model is None or optimizer is None:
            raise ConfigError("GradDoctorCallback needs the Trainer's model and optimizer in on_train_begin; "
                              f"got model={type(model).__name__}, optimizer={type(optimizer).__name__}")
        run_dir = self.run_dir if self.run_dir is not None else default_run_dir(args)
        options = dict(self.watch_options)
        if "mirror" not in options and state.is_world_process_zero:  # the other processes record nothing
            self._report_to = ReportTo(args)
            options["mirror"] = self._report_to.mirrors
        # Accelerate's AcceleratedOptimizer holds the fp16 GradScaler (None otherwise); watch unwraps the optimizer.
        try:
            self.watch = watch(model, optimizer, run_dir, scaler=getattr(optimizer, "scaler", None), **options)
        except BaseException:
            self.close()  # the SummaryWriter opened for report_to
            raise
        self._hook = SyncBackwardHook(model, is_sync=_sync_gradients, on_sync=self._record,
                                      summed_scale=_token_average_scale(args))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.watch is not None and not self._stepped and not self._warned_missed:
            self._warned_missed = True
            warnings.warn(f"graddoctor: optimizer step {state.global_step} was not recorded: no backward through the "
                          "model's output was seen on its last micro-batch (the model returned no tensor that "
                          "needs a gradient, or the loss was not computed from its output)", RuntimeWarning,
                          stacklevel=2)
        self._stepped = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ own
    def close(self) -> None:
        """Remove the hook and close the watch (flushing it). Safe to call twice.

        The Trainer calls no callback when training raises: the watch then stays open until the
        process exits (graddoctor closes open watches at exit, also on Ctrl-C and SIGTERM), the next
        `trainer.train()`, or this call.
        """
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self._report_to is not None:
            self._report_to.close()
            self._report_to = None

    def _record(self, loss: Optional[Tensor]) -> None:
        """Step the watch at the end of an optimizer step's last backward, before the Trainer clips."""
        assert self.watch is not None, "the hook exists only while the watch is open"
        if self._stepped:  # a second backward on the last micro-batch (a custom training_step)
            if not self._warned_twice:
                self._warned_twice = True
                warnings.warn("graddoctor: more than one backward on an optimizer step's last micro-batch; "
                              "the gradients after the first are recorded, those after the others are not",
                              RuntimeWarning, stacklevel=2)
            return
        self._stepped = True
        self.watch.step(loss)


def default_run_dir(args: Any) -> str:
    """`<args.logging_dir or args.output_dir>/graddoctor` (transformers 5 has no `logging_dir`)."""
    base = getattr(args, "logging_dir", None) or args.output_dir
    if base is None:
        raise ConfigError("GradDoctorCallback(run_dir=None) needs TrainingArguments.output_dir "
                          "(or logging_dir): give run_dir= or an output_dir")
    return os.path.join(base, "graddoctor")


def hidden_gradients(args: Any) -> Optional[str]:
    """Why the gradients are out of a callback's sight in this run, or None when they are not."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    # read, not AcceleratorState(): building one would initialise accelerate's state where the Trainer has not
    distributed_type = AcceleratorState._shared_state.get("distributed_type")
    deepspeed = bool(getattr(args, "deepspeed", None)) or distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        return ("DeepSpeed steps the optimizer inside backward and keeps the gradients in its own partitioned "
                "buffers, so param.grad is None where a callback can look; the gradients are hidden from graddoctor")
    return None


def _sync_gradients() -> bool:
    """True during the last micro-batch of an optimizer step (the Trainer sets it before each micro-batch)."""
    from accelerate.state import GradientState
    return bool(GradientState().sync_gradients)


def _token_average_scale(args: Any) -> float:
    """The factor the Trainer applies to a token-normalised loss (`average_tokens_across_devices`):
    each process divides by the global token count, and the Trainer multiplies by the process count."""
    import torch.distributed as dist

    if not getattr(args, "average_tokens_across_devices", False):
        return 1.0
    return float(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1.0
