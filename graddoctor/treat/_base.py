"""Gradient transforms, optax-style: a pair of functions and a small typed state.

A transform is a `GradientTransform[S](name, init, update, report)`, generic in its state type `S`:

- `init(params, names=None) -> S`: the state, a small dataclass of its own (see `TransformState`);
- `update(grads, state, stats, params=None) -> (grads, S)`: `grads` is the list of
  gradients (None where a parameter has no gradient), in the order of `stats`, the
  `TensorStats` that `watch` already computed for them. Transforms change the gradients
  in place (as `clip_grad_norm_` does) and return the list. A transform returns
  `None` instead of a list to say "skip this optimizer step" (see `skip_nonfinite`);
- `report(S) -> dict`: what the last update did (clip coefficient, ...), as device
  tensors or plain values, recorded by the guard without a host sync.

`chain(*transforms)` runs transforms in order, each on the output of the one before, and
each sees the statistics of the gradients it gets: a transform that scales gradients
(`clip_norm`, `clip_norm_per_tensor`, `auto_clip`, `zclip`) says how through `stats_after`,
which rescales the [P] statistics on the device (no pass over the gradients); after one
that changes gradients entry by entry (`clip_value`, `agc`) the chain measures them again
with `tensor_stats` (one more fused pass), and only if another transform follows.

References:
  optax, `optax/transforms/_combining.py` (chain) and `_clipping.py`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Callable, Generic, Optional, Protocol, Sequence, TypeVar, cast

import torch
from torch import Tensor

from .._errors import GradDoctorError
from ..core import _native
from ..core._stats import TensorStats, group_by_device_dtype, tensor_stats

Grads = list[Optional[Tensor]]


class TransformStateError(GradDoctorError, ValueError):
    """A state_dict does not fit the transform state it is loaded into."""


class TransformState:
    """Base of every transform state: `state_dict` / `load_state_dict` over the dataclass fields.

    Tensors are cloned on save and copied (to the device of the current value) on load,
    as `torch.optim.Optimizer.state_dict` does.
    """

    def state_dict(self) -> dict[str, Any]:
        return {f.name: _clone(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        if set(state) != names:
            raise TransformStateError(f"{type(self).__name__}.load_state_dict got keys {sorted(state)}; "
                                      f"expected exactly {sorted(names)}")
        for name in names:
            setattr(self, name, _load(getattr(self, name), state[name]))


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, TransformState):
        return value.state_dict()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return copy.deepcopy(value)


def _load(current: Any, saved: Any) -> Any:
    if isinstance(current, Tensor):
        return torch.as_tensor(saved).to(device=current.device, dtype=current.dtype).clone()
    if isinstance(current, TransformState):
        current.load_state_dict(saved)
        return current
    if isinstance(current, (list, tuple)) and isinstance(saved, (list, tuple)) and len(current) == len(saved):
        return type(current)(_load(c, s) for c, s in zip(current, saved))
    return copy.deepcopy(saved)


@dataclass
class EmptyState(TransformState):
    """State of a transform that keeps nothing between steps."""


S = TypeVar("S", bound=TransformState)
S_co = TypeVar("S_co", bound=TransformState, covariant=True)


class InitFn(Protocol[S_co]):
    """`init(params, names=None) -> state`."""

    def __call__(self, params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> S_co: ...


class UpdateFn(Protocol[S]):
    """`update(grads, state, stats, params=None) -> (grads, or None to skip the step; new state)`."""

    def __call__(self, grads: Grads, state: S, stats: TensorStats,
                 params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], S]: ...


def no_report(state: TransformState) -> dict[str, Any]:
    """`report` of a transform with nothing to record."""
    return {}


@dataclass(frozen=True)
class GradientTransform(Generic[S]):
    """A gradient transform with state type `S`: `init`, `update` and `report` (see the module docstring).

    Attributes:
      name: short name, used as the key prefix of recorded interventions.
      init: `(params, names=None) -> S`.
      update: `(grads, S, stats, params=None) -> (grads or None, S)`.
      report: `S -> dict` of what the last update did (device tensors allowed).
      host_syncs: host syncs per step that `update` needs (0 for every clipping transform).
      stats_after: `(stats, S) -> stats` of the gradients after `update`, derived without a
        pass over them; None: unknown (a chain measures them again when a transform follows).
    """

    name: str
    init: InitFn[S]
    update: UpdateFn[S]
    report: Callable[[S], dict[str, Any]] = no_report
    host_syncs: int = 0
    stats_after: Optional[Callable[[TensorStats, S], TensorStats]] = None


@dataclass
class ChainState(TransformState):
    """The states of a chain's transforms, in order."""

    inner: tuple[TransformState, ...]

    def state_dict(self) -> dict[str, Any]:
        return {"inner": [s.state_dict() for s in self.inner]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("inner") if isinstance(state, dict) else None
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.inner):
            keys = sorted(state) if isinstance(state, dict) else "-"
            raise TransformStateError(f"ChainState.load_state_dict expected {{'inner': [{len(self.inner)} states]}}, "
                                      f"got {type(state).__name__} with keys {keys}")
        for s, d in zip(self.inner, saved):
            s.load_state_dict(d)


def chain(*transforms: GradientTransform[Any]) -> GradientTransform[ChainState]:
    """Compose transforms: each `update` gets the gradients the previous one returned.

    If a transform returns None (skip the step), the rest are not called and keep
    their state, so a skipped non-finite step does not feed NaN into an EMA. Each
    transform gets the statistics of its input gradients (see the module docstring).

    Args:
      *transforms: the transforms to run, in order.
    Returns:
      A `GradientTransform` whose state is a `ChainState`; its host syncs are the sum.
    """
    if not transforms or not all(isinstance(t, GradientTransform) for t in transforms):
        raise GradDoctorError("chain() takes one or more GradientTransform, "
                              f"got {[type(t).__name__ for t in transforms]}")
    keys = _unique_names([t.name for t in transforms])

    def init(params: Sequence[Tensor], names: Optional[Sequence[str]] = None) -> ChainState:
        return ChainState(tuple(t.init(params, names) for t in transforms))

    def update(grads: Grads, state: ChainState, stats: TensorStats,
               params: Optional[Sequence[Tensor]] = None) -> tuple[Optional[Grads], ChainState]:
        new = list(state.inner)
        for i, t in enumerate(transforms):
            out, new[i] = t.update(grads, new[i], stats, params)
            if out is None:  # skip the step: the transforms after this one keep their state
                return None, ChainState(tuple(new))
            grads = out
            if i + 1 < len(transforms):
                stats = t.stats_after(stats, new[i]) if t.stats_after else tensor_stats(grads, stats.norm.device)
        return grads, ChainState(tuple(new))

    def report(state: ChainState) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, t, s in zip(keys, transforms, state.inner):
            out.update({f"{key}.{k}": v for k, v in t.report(s).items()})
        return out

    return GradientTransform("chain", init, update, report, sum(t.host_syncs for t in transforms))


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}{seen[n]}")
    return out


def take(grads: Grads, idx: Sequence[int]) -> list[Tensor]:
    """The gradients at `idx`, the indices of one `group_by_device_dtype` group (so none is None)."""
    return cast(list[Tensor], [grads[i] for i in idx])


def scale_(grads: Grads, coef: Tensor) -> None:
    """Multiply every present gradient by the 0-d tensor `coef`: one pass per group, no sync.

    This is the multiplication of `torch.nn.utils.clip_grads_with_norm_`, so the results agree bit for bit.
    PyTorch multiplies even by 1, because on an accelerator asking whether the coefficient
    is 1 would wait for the device. A CPU coefficient is already in host memory, so there a
    coefficient of exactly 1 (no clipping, the common step) skips the pass over the
    gradients: x * 1.0 == x for every float, so the result is the same bit for bit. Other
    CPU float32 coefficients go to the native kernel (the same float32 products; inside a
    training step never slower than `_foreach_mul_`, at times much faster: BENCHMARKS.md).
    """
    if coef.device.type == "cpu" and coef.numel() == 1:
        c = float(coef)
        if c == 1.0:
            return
        if coef.dtype == torch.float32 and _native.scale_(grads, c):  # type: ignore[arg-type]
            return
    for (device, _), idx in group_by_device_dtype(grads).items():
        torch._foreach_mul_(take(grads, idx), coef.to(device))


def scale_each_(grads: Grads, coefs: Tensor) -> None:
    """Multiply gradient i by `coefs[i]` (a [P] tensor), one `_foreach_mul_` per group. No sync."""
    for (device, _), idx in group_by_device_dtype(grads).items():
        local = coefs.to(device)
        factors: list[Tensor] = [local[i] for i in idx]
        torch._foreach_mul_(take(grads, idx), factors)


def scaled_stats(stats: TensorStats, coef: Tensor) -> TensorStats:
    """Statistics of the gradients after multiplying them by `coef` (0-d, or [P] per tensor). No sync.

    Norms and max-abs scale with |coef|; non-finite counts do not change. Missing tensors stay NaN.
    """
    norm, maxabs = stats.norm * coef, stats.maxabs * coef
    total = stats.total_norm * coef if coef.ndim == 0 else torch.linalg.vector_norm(torch.nan_to_num(norm, nan=0.0))
    return TensorStats(norm, maxabs, stats.nonfinite, total, stats.present)


def unchanged_stats(stats: TensorStats, state: Any) -> TensorStats:
    """`stats_after` of a transform that does not change the gradients it passes on."""
    return stats


def clip_coefficient(max_norm: Tensor | float, norm: Tensor) -> Tensor:
    """`clamp(max_norm / (norm + 1e-6), max=1)`: PyTorch's clip coefficient, no branch, no sync."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def clip_by_total_norm_(grads: Grads, max_norm: float, total: Tensor) -> Tensor:
    """Scale the gradients by `clip_coefficient(max_norm, total)` in place; return that 0-d coefficient. No sync.

    `clip_coefficient` then `scale_`, with the same results bit for bit. On CPU float32
    gradients the native kernel forms the coefficient and multiplies in one call, saving the
    four 0-d tensor ops, which inside a training step cost ~0.1 ms (BENCHMARKS.md).
    """
    # None where the kernel cannot: off the CPU, other dtypes, missing gradients
    coef = _native.clip_scale_(grads, total, max_norm)  # type: ignore[arg-type]
    if coef is None:
        coef = clip_coefficient(max_norm, total)
        scale_(grads, coef)
    return coef


def check_positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """Return `value` as a float, or raise `ConfigError` naming it and what is allowed."""
    from .._errors import ConfigError

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok or value != value or value == float("inf"):
        raise ConfigError(f"{name}={value!r} is not allowed: use a finite number {'>= 0' if allow_zero else '> 0'}")
    return float(value)


def check_int(name: str, value: Any, low: int) -> int:
    """Return `value`, an integer >= `low` (not a bool), or raise `ConfigError` naming it and what is allowed."""
    from .._errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is not allowed: use an integer >= {low}")
    return value
