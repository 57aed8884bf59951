"""skip_step: skip a bad optimizer step (non-finite gradients, or a grad-norm spike) with no host sync.

The decision is a 0-d bool `ok` on the device, never read by the host:
- non-finite: any gradient entry is NaN/Inf (the counts `watch` computed) or the global norm is;
- spike (OLMo-core's rule): after `warmup` accepted steps, the global gradient norm is above
  mean + `sigma` * std of the last `window` accepted norms.

How a bad step leaves the model alone, bit for bit, without the host knowing it is bad:
1. the gradients are zeroed on the device (`masked_fill_`, as NaN * 0 would stay NaN), so the
   optimizer and the transforms after this one never see NaN;
2. a zero gradient still moves Adam's moments, its step count and SGD's momentum, so an
   optimizer step pre-hook copies the parameters that have a gradient and their optimizer state,
   and a post-hook puts them back with `torch.where(ok, new, old)`. State the step created (the
   first step of Adam, SGD's first momentum buffer) is zeroed on a bad step instead: Adam's fresh
   state is zeros, so this is the same as absent; SGD's momentum buffer too when dampening is 0.

Untouched bit for bit on a bad step: every optimizer whose state is made of tensors on the
statistics' device (SGD with or without momentum, Adam, AdamW, RMSprop, Adagrad, ... on the CPU;
on an accelerator Adam/AdamW keep `step` on the host unless `capturable=True` or `fused=True`,
and a host-side value cannot be restored without a sync: such a step raises a clear error).
Cost per step: one copy of those parameters and their state (Adam: three times the parameters'
size) and one `where` pass over them. That memory is the price of no sync; `skip_nonfinite`
(one host sync, no copy, raises after too many bad steps in a row, names the bad tensors) is
the choice when memory is short.

References:
  OLMo-core `optim/skip_step_optimizer.py` (rolling window, 6 sigma, device-side step factor).
  torch/amp/grad_scaler.py (a skipped step leaves the optimizer state alone).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .._errors import ConfigError, GradDoctorError
from ..core._stats import TensorStats
from ._base import GradientTransform, Grads, TransformState, check_int, check_positive
from ._transforms import stats_device


@dataclass
class SkipStepState(TransformState):
    """State of `skip_step` (all device tensors: nothing here is read by the host during training).

    Attributes:
      ok: bool 0-d, whether the last step was applied.
      nonfinite, spike: bool 0-d, why the last step was skipped.
      history: float32 [window], the last accepted global gradient norms (a ring).
      count: int64 0-d, accepted steps so far; pos: int64 0-d, the ring's next slot.
      skipped_total: int64 0-d, steps skipped over the run.
    """

    ok: Tensor
    nonfinite: Tensor
    spike: Tensor
    history: Tensor
    count: Tensor
    pos: Tensor
    skipped_total: Tensor


class StepRestore:
    """Optimizer step pre/post hooks that undo the step when the device flag `ok` is False. No host sync."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.ok: Optional[Tensor] = None  # set by the transform on each step, consumed by the post-hook
        self._saved: list[tuple[Tensor, Tensor]] = []  # (live tensor, its copy before the step)
        self._before: set[int] = set()
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]
        self.copied_numel = 0  # elements copied before the last step

    def _live(self) -> list[Tensor]:
        """The parameters that have a gradient, and every tensor of their optimizer state."""
        out = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                out.append(p)  # itself, not `p.data` (a new object each time: `_post` matches by id)
                for key, value in self.optimizer.state.get(p, {}).items():
                    if not isinstance(value, Tensor):
                        raise GradDoctorError(f"skip_step cannot restore {type(self.optimizer).__name__}'s state "
                                              f"{key!r} ({type(value).__name__}, a host value) without a sync; "
                                              "use skip_nonfinite() (one host sync per step)")
                    out.append(value)
        return out

    @staticmethod
    def _check_device(t: Tensor, ok: Tensor) -> None:
        if t.device != ok.device:
            raise GradDoctorError(f"skip_step: optimizer state on {t.device} and the skip decision on "
                                  f"{ok.device}; restoring it would need a sync. Create Adam/AdamW with "
                                  "capturable=True or fused=True (state on the device), or use skip_nonfinite()")

    @torch.no_grad()
    def _pre(self, *_: Any) -> None:
        if self.ok is None:
            return
        live = self._live()
        for t in live:
            self._check_device(t, self.ok)
        self._saved = [(t, t.detach().clone()) for t in live]
        self._before = {id(t) for t in live}
        self.copied_numel = sum(t.numel() for t in live)

    @torch.no_grad()
    def _post(self, *_: Any) -> None:
        if self.ok is None:
            return
        ok, self.ok = self.ok, None
        for t, old in self._saved:
            torch.where(ok, t, old, out=t)  # exact: the old bits on a bad step, the new ones otherwise
        for t in self._live():  # state this step created: zero (a fresh state) on a bad step
            if id(t) not in self._before:
                self._check_device(t, ok)
                t.masked_fill_(~ok, 0)
        self._saved, self._before = [], set()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def skip_step(optimizer: torch.optim.Optimizer, sigma: float = 6.0, window: int = 128,
              warmup: int = 20) -> GradientTransform[SkipStepState]:
    """Skip non-finite and spiking optimizer steps with a device-side decision: no host sync.

    Host syncs per step: 0. Records `skip_step.skipped`, `.nonfinite`, `.spike` (0/1, read at flush).
    Put it first in a `chain`: the transforms after it see zero gradients on a skipped step.

    Args:
      optimizer: the optimizer whose step is undone on a bad step (the hooks are installed on it).
      sigma: a spike is a global grad norm above mean + sigma * std of the window (OLMo-core: 6).
      window: accepted steps in the rolling window (OLMo-core: 128).
      warmup: accepted steps before a spike may be judged (>= 2).
    Returns:
      A `GradientTransform`; `update` always returns the (zeroed on a bad step) gradients.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(f"skip_step(optimizer=...) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    k = check_positive("sigma", sigma)
    check_int("window", window, 2)
    check_int("warmup", warmup, 2)
    restore = StepRestore(optimizer)

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> SkipStepState:
        dev = stats_device(params)
        no = torch.zeros((), dtype=torch.bool, device=dev)
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        return SkipStepState(~no, no, no, torch.zeros(window, device=dev), zero, zero, zero)

    def update(grads: Grads, state: SkipStepState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], SkipStepState]:
        x = stats.total_norm.to(torch.float32)
        nonfinite = (stats.nonfinite > 0).any() | ~torch.isfinite(x)
        spike = (state.count >= warmup) & (x > _threshold(state, k))
        ok = ~(nonfinite | spike)
        for g in grads:
            if g is not None:
                g.masked_fill_(~ok, 0)
        restore.ok = ok
        slot = state.pos.reshape(1)  # a tensor index: `history[pos]` would read pos on the host
        history = state.history.index_copy(0, slot, torch.where(ok, x.reshape(1), state.history.gather(0, slot)))
        step = ok.to(torch.int64)
        return grads, SkipStepState(ok, nonfinite, spike, history, state.count + step, (state.pos + step) % window,
                                    state.skipped_total + (1 - step))

    def report(s: SkipStepState) -> dict[str, Tensor]:
        return {"skipped": (~s.ok).to(torch.float32), "nonfinite": s.nonfinite.to(torch.float32),
                "spike": s.spike.to(torch.float32)}

    def stats_after(stats: TensorStats, s: SkipStepState) -> TensorStats:
        zero = torch.zeros((), device=stats.norm.device)  # the gradients are zero on a skipped step
        return TensorStats(torch.where(s.ok, stats.norm, zero), torch.where(s.ok, stats.maxabs, zero),
                           torch.where(s.ok, stats.nonfinite, 0), torch.where(s.ok, stats.total_norm, zero),
                           stats.present)

    return GradientTransform("skip_step", init, update, report, stats_after=stats_after)


def _threshold(state: SkipStepState, sigma: float) -> Tensor:
    """mean + sigma * std (unbiased) of the accepted norms in the window. No host sync."""
    n = torch.clamp(state.count, max=state.history.numel())
    filled = torch.arange(state.history.numel(), device=n.device) < n
    nf = torch.clamp(n, min=1).to(torch.float32)
    mean = torch.where(filled, state.history, 0.0).sum() / nf
    var = torch.where(filled, (state.history - mean) ** 2, 0.0).sum() / torch.clamp(nf - 1, min=1.0)
    return mean + sigma * torch.sqrt(var)
