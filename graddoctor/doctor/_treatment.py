"""How the doctor applies one remedy of the catalogue to a freshly built training run.

A remedy changes one part of a run; the doctor knows which part and applies it with the catalogue's own
function (`graddoctor.treat._catalogue.CATALOGUE[id].apply`, nothing re-implemented):
- "model": surgery that replaces modules (activation swap, norm or residual insertion, RNN -> LSTM/GRU,
  pre-LN); the optimizer is then rebuilt, same class and hyper-parameters, over the new parameters;
- "init": an in-place re-initialization (He, Xavier, orthogonal, LSUV on the first batch, zero-residual);
- "guard": a gradient transform given to `gd.watch(guard=...)` (clipping, skipping non-finite steps);
- "lr": every group's learning rate scaled (`lower_learning_rate` is the catalogue's x0.1; `lr_x0.3` a control);
- "schedule": `lr_warmup` over the first fifth of the steps;
- "penalty": an L1/L2 term added to the loss that is back-propagated (the recorded loss stays the data loss,
  so trials compare on one scale);
- "data": `sanitize_inputs`, NaN/Inf zeroed and inputs clamped to [-10, 10].
Two remedies that change the same part (`slot`) are not combined. Remedies that are changes to the user's
own code (fewer layers, smaller batches, truncated BPTT), or to the loop's control flow (rollback, layer-wise
pretraining), are reported as not tried.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .._errors import ConfigError
from ..treat._base import chain
from ..treat._catalogue import CATALOGUE
from ..treat._schedule import lr_warmup


@dataclass(frozen=True)
class Treatment:
    """One remedy as the doctor runs it.

    Fields:
      id: the catalogue id, or "lr_x0.3" (the one control the catalogue does not list).
      kind: which part of the run it changes (see the module docstring); it fixes the order of application.
      slot: remedies in one slot replace each other and are never combined.
      cost: how much of the user's code it changes: 0 a training setting, 1 the weights' init, 2 the model.
      lr_scale: for kind "lr", the factor of every group's learning rate.
    """

    id: str
    kind: str
    slot: str
    cost: int
    lr_scale: float = 1.0


_KIND_ORDER = ("model", "init", "lr", "schedule", "guard", "penalty", "data")
_COST = {"model": 2, "init": 1}
_MODEL_SLOTS = {"relu": "activation", "leaky_relu": "activation", "elu": "activation",
                "batch_norm": "norm", "layer_norm": "norm", "pre_layer_norm": "norm",
                "add_residual": "architecture", "rnn_to_lstm": "architecture", "rnn_to_gru": "architecture"}
_INITS = ("he_init", "xavier_init", "lsuv_init", "orthogonal_init", "zero_residual_init")
_GUARDS = ("clip_value", "clip_norm", "clip_norm_per_tensor", "auto_clip", "agc", "zclip", "skip_nonfinite")
NOT_RUN = {  # id -> why the doctor does not try it
    "rollback": "changes the loop's control flow (restore and skip batches)",
    "layerwise_pretrain": "needs a pretraining phase and its own data",
    "fewer_layers": "a change to your model's code",
    "smaller_batches": "a change to your data loader",
    "truncated_bptt": "a change to your training loop",
}
PENALTY_COEF = {"l1_penalty": 1e-5, "l2_penalty": 1e-4}  # the catalogue snippets' coefficients


def treatment(remedy_id: str) -> Optional[Treatment]:
    """The Treatment of a catalogue id (or a former id), or "lr_x0.3"; None for a remedy the doctor does not run."""
    if remedy_id == "lr_x0.3":
        return Treatment("lr_x0.3", "lr", "lr", 0, 0.3)
    cure_id = CATALOGUE[remedy_id].id
    if cure_id in NOT_RUN:
        return None
    kind = ("model" if cure_id in _MODEL_SLOTS else "init" if cure_id in _INITS else "guard" if cure_id in _GUARDS
            else "lr" if cure_id == "lower_learning_rate" else "schedule" if cure_id == "lr_warmup"
            else "penalty" if cure_id in PENALTY_COEF else "data" if cure_id == "sanitize_inputs" else "")
    if not kind:  # a cure added to the catalogue that this table does not know yet
        return None
    slot = _MODEL_SLOTS.get(cure_id, kind)
    return Treatment(cure_id, kind, slot, _COST.get(kind, 0), 0.1 if cure_id == "lower_learning_rate" else 1.0)


def compatible(treatments: tuple[Treatment, ...]) -> bool:
    """No two of them change the same part of the run."""
    slots = [t.slot for t in treatments]
    return len(slots) == len(set(slots))


@dataclass
class Setup:
    """A run ready to train: the model, its optimizer and the trial's changes to the loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    guard: Any = None
    scheduler: Any = None
    penalty: Optional[Callable[[nn.Module], Tensor]] = None
    clean_inputs: bool = False
    changes: list[str] = field(default_factory=list)


def rebuilt_optimizer(old: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """A new optimizer of `old`'s class and hyper-parameters over `model`'s parameters (one group: the model's
    parameters changed, so a per-group split of the old ones cannot be carried over)."""
    group = {k: v for k, v in old.param_groups[0].items() if k != "params"}
    return type(old)([p for p in model.parameters() if p.requires_grad], **group)


def apply_treatments(treatments: tuple[Treatment, ...], model: nn.Module, optimizer: torch.optim.Optimizer,
                     first_x: Any, steps: int) -> Setup:
    """Apply `treatments` to a freshly built (model, optimizer), model changes first.

    Raises whatever the catalogue function raises when it does not fit the model (e.g.
    `SurgeryNotApplicableError`); the doctor records that trial as failed.
    """
    setup = Setup(model, optimizer)
    guards = []
    for t in sorted(treatments, key=lambda t: _KIND_ORDER.index(t.kind)):
        apply = CATALOGUE[t.id].apply if t.id in CATALOGUE else None
        if t.kind == "model":
            setup.model, changes = apply(setup.model)  # type: ignore[misc]
            setup.optimizer = rebuilt_optimizer(setup.optimizer, setup.model)
            setup.changes += changes
        elif t.kind == "init":
            done = apply(setup.model, _as_tensor(first_x)) if t.id == "lsuv_init" else apply(setup.model)  # type: ignore[misc]
            setup.optimizer = rebuilt_optimizer(setup.optimizer, setup.model)  # fresh state over the new weights
            setup.changes += list(done or [])
        elif t.kind == "lr":
            for g in setup.optimizer.param_groups:
                g["lr"] = g["lr"] * t.lr_scale
            setup.changes.append(f"lr x{t.lr_scale:g}")
        elif t.kind == "schedule":
            setup.scheduler = lr_warmup(setup.optimizer, warmup_steps=max(1, steps // 5))
            setup.changes.append(f"lr warmup over {max(1, steps // 5)} steps")
        elif t.kind == "guard":
            guards.append(apply())  # type: ignore[misc]
        elif t.kind == "penalty":
            coef = PENALTY_COEF[t.id]
            setup.penalty = lambda m, apply=apply, coef=coef: apply(m, coef)
            setup.changes.append(f"{t.id} coef {coef:g}")
        else:
            setup.clean_inputs = True
    if guards:
        setup.guard = guards[0] if len(guards) == 1 else chain(*guards)
        setup.changes.append("guard " + "+".join(t.id for t in treatments if t.kind == "guard"))
    return setup


def clean(x: Any) -> Any:
    """`sanitize_inputs`, as its catalogue snippet: NaN/Inf zeroed, values clamped to [-10, 10]."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10, 10)
    return x


def _as_tensor(x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise ConfigError(f"lsuv_init needs the model's input as one tensor, got {type(x).__name__}")
    return x
