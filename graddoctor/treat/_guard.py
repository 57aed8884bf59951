"""Guard: run a gradient transform on a model's gradients right before each optimizer step.

Two ways to use it:

    # with watch: the guard reuses the statistics watch computes anyway, records each intervention
    w = gd.watch(model, opt, run_dir="runs/a", guard=gd.chain(gd.skip_nonfinite(), gd.zclip()))
    loss.backward(); w.step(loss); opt.step()

    # without watch: a step pre-hook on the optimizer computes the statistics itself
    g = gd.treat.Guard(gd.clip_norm(1.0), model.named_parameters()).attach(opt)
    loss.backward(); opt.step()

What the guard records (with watch, kind "guard", one event per step): each transform's
`report`, keyed `<transform>.<field>`, e.g. `clip_norm.coef`, with device tensors
resolved at the next flush (no sync). A skipped step records kind "skipped_step" instead,
with the names of the tensors that held NaN/Inf.

Skipping: when the transform returns None, every `p.grad` is set to None, so the
optimizer step that follows leaves parameters and optimizer state untouched.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .._errors import GradDoctorError
from ..core._stats import TensorStats, tensor_stats
from ._base import GradientTransform
from ._transforms import stats_device

Recorder = Callable[[str, dict, int], None]  # (kind, data, step)


class Guard:
    """Holds a transform and its state for one list of parameters.

    Attributes:
      transform: the `GradientTransform` (often a `chain`).
      state: its current state.
      params, names: the guarded parameters and their names, in the order of `TensorStats`.
      skipped: whether the last step was skipped; steps: steps seen; skipped_total: steps skipped.
    """

    def __init__(self, transform: GradientTransform[Any], params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
                 names: Optional[list[str]] = None):
        if not isinstance(transform, GradientTransform):
            raise GradDoctorError(f"guard= takes a GradientTransform (e.g. gd.clip_norm(1.0) or gd.chain(...)), "
                                  f"got {type(transform).__name__}")
        items: list[Any] = list(params)
        if items and isinstance(items[0], tuple):  # named_parameters()
            names, items = [n for n, _ in items], [p for _, p in items]
        self.params: list[Tensor] = [p for p in cast(list[Tensor], items) if p.requires_grad]
        self.names = list(names) if names is not None else [f"param[{i}]" for i in range(len(self.params))]
        self.transform = transform
        self.state = transform.init(self.params, self.names)
        self.skipped = False
        self.steps = 0
        self.skipped_total = 0
        self._hook: Optional[RemovableHandle] = None

    def apply(self, stats: TensorStats, record: Optional[Recorder] = None, step: Optional[int] = None) -> bool:
        """Transform the current gradients, given their statistics; skip the step if asked.

        Host syncs: those of the transform (`transform.host_syncs`), nothing else.

        Args:
          stats: `TensorStats` of `[p.grad for p in params]`, as `watch` computes them.
          record: called as `record(kind, data, step)` for each intervention (watch's `record_event`).
          step: the step index to record.
        Returns:
          True if the optimizer should step, False if the step was skipped (grads set to None).
        """
        grads = [p.grad for p in self.params]
        new, self.state = self.transform.update(grads, self.state, stats, self.params)
        self.skipped = new is None
        if new is None:
            for p in self.params:
                p.grad = None
            self.skipped_total += 1
        elif new is not grads:  # transforms work in place and hand back the same list; else set what changed
            for p, g in zip(self.params, new):
                if g is not p.grad:
                    p.grad = g
        self.steps += 1
        if record is not None:
            self._record(record, step if step is not None else self.steps - 1)
        return not self.skipped

    def _record(self, record: Recorder, step: int) -> None:
        if self.skipped:  # the transforms after the skip did not run: report only the skip
            record("skipped_step", {"bad": list(_find_bad(self.state))}, step)
        else:
            record("guard", self.report(), step)

    def report(self) -> dict[str, Any]:
        """What the last step did, keyed `<transform>.<field>` (device tensors, not synced)."""
        rep = self.transform.report(self.state)
        if self.transform.name == "chain":
            return rep
        return {f"{self.transform.name}.{k}": v for k, v in rep.items()}

    def step(self) -> bool:
        """Measure the gradients (one fused pass, no sync) and apply; for use without `watch`."""
        stats = tensor_stats([p.grad for p in self.params], stats_device(self.params))
        return self.apply(stats)

    def attach(self, optimizer: torch.optim.Optimizer) -> "Guard":
        """Run `step()` before every `optimizer.step()` (an optimizer step pre-hook). Returns self."""
        self.detach()
        def pre_hook(opt, args, kwargs) -> None:  # a pre-hook must return None (or new args)
            self.step()

        self._hook = optimizer.register_step_pre_hook(pre_hook)
        return self

    def detach(self) -> None:
        """Remove the hook installed by `attach`, if any."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        return {"transform": self.state.state_dict(), "steps": self.steps, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state["transform"])
        self.steps = int(state["steps"])
        self.skipped_total = int(state["skipped_total"])


def _find_bad(state: Any) -> tuple[str, ...]:
    """Names of the bad tensors held by a `SkipState`, wherever it sits in a chain."""
    bad = getattr(state, "bad", None)
    if isinstance(bad, tuple):
        return bad
    for inner in getattr(state, "inner", ()):
        found = _find_bad(inner)
        if found:
            return found
    return ()


def as_guard(guard: Any, params: list[Tensor], names: list[str]) -> Optional[Guard]:
    """`watch(guard=...)` accepts a transform (wrapped here) or a ready `Guard`, or None."""
    if guard is None:
        return None
    if isinstance(guard, Guard):
        if [id(p) for p in guard.params] != [id(p) for p in params]:
            raise GradDoctorError(f"the Guard holds {len(guard.params)} parameters that are not the watched model's "
                                  f"{len(params)} trainable parameters, in order; pass the transform itself as guard=")
        return guard
    return Guard(guard, params, names)

