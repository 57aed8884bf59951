"""Vanishing through time: how much of a recurrent layer's last-step gradient reaches its first step.

Per-parameter norms cannot see it: a recurrent weight's gradient is a sum over time steps, and the
near steps fill it whatever happens to the far ones.

What is measured, and why. A tensor hook on the output sequence y of an `nn.RNN`/`nn.LSTM`/`nn.GRU`
sees dL/dy_t as the layers above hand it back: only the *direct* part at each step. The part that
flows back through time stays inside the module's backward and never shows on y. And the total
gradient dL/dh_t would not show vanishing in a language model anyway: there every position has its
own loss, so the near losses keep each dL/dh_t large while the long-range part dies. So one gradient
is followed back through time instead: the last step's g_T = dL/dy_T, carried back to each earlier
step t as (dh_T/dh_t)^T g_T (h_t: the whole carried state after step t, every layer, with an LSTM's
cell state). In sequence classification (a loss on the last step only) that is exactly the total
gradient dL/dh_t; in a language model it is the part of dL/dh_t that the last position's loss sends,
the long-range part. Its norm at the first step over its norm at the last is the through-time gain
over T - 1 steps: 1e-12 says the first inputs cannot be learned from the last step's error.

How. On sampled steps (`activation_every`), a forward hook re-runs the module on the same input
and initial state (its base class's forward: no hooks fire), cut after the measured positions, so the
states between the pieces are tensors of a small separate graph with the same weights (dropout between
layers is left out: the measure is of the recurrence, not of one dropout mask). A tensor hook on the
real output takes g_T at backward and carries it back through that graph with one `autograd.grad` of
the recurrent layer alone. Cost on a sampled step: one more forward and backward of the recurrent
module; nothing on other steps. No host sync: the norms stay on the device.

Not measured: bidirectional modules (their second direction runs the other way), PackedSequence input,
sequences of one step, modules none of whose parameters train, and models under torch.compile.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, cast

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..store._series import TIME_FIELDS, TIME_POSITIONS
from ._sampled_hooks import SampledHooks

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def time_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recurrent modules whose gradient through time is measured, as (name, module), in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _RECURRENT) and not m.bidirectional]


def time_lags(T: int, K: int = TIME_POSITIONS) -> list[int]:
    """K lags from the last step, log-spaced from 0 (the last step) to T - 1 (the first): round(T^(k/(K-1))) - 1."""
    return [min(T - 1, max(0, round(T ** (k / (K - 1))) - 1)) for k in range(K)]


def safe_norm(t: Tensor) -> Tensor:
    """L2 norm in float32 without underflow: the max-abs times the norm of t / max-abs (the squares of a
    gradient that has vanished to 1e-24 would be 0 in float32). NaN/Inf entries give NaN."""
    t = t.detach().float()
    m = t.abs().amax()
    return m * (t / m.clamp_min(torch.finfo(torch.float32).tiny)).norm()


class _Probe:
    """One sampled forward of a recurrent module: its re-run graph, waiting for the output's gradient."""

    def __init__(self, index: int, last: Tensor, states: list[Tensor], cuts: list[int], T: int, time_dim: int):
        self.index, self.last, self.states, self.cuts, self.T, self.time_dim = index, last, states, cuts, T, time_dim

    def row(self, grad: Tensor) -> Tensor:
        """The `TIME_FIELDS` row from the output's gradient (no host sync)."""
        g_T = grad.detach().select(self.time_dim, -1).to(self.last.dtype)
        parts = torch.autograd.grad(self.last, self.states, g_T, allow_unused=True)
        per_cut = len(self.states) // max(1, len(self.cuts))
        norm_at = {self.T - 1: safe_norm(g_T)}
        for i, p in enumerate(self.cuts):
            mine = [safe_norm(g) for g in parts[i * per_cut:(i + 1) * per_cut] if g is not None]
            norm_at[p] = safe_norm(torch.stack(mine)) if mine else g_T.new_zeros((), dtype=torch.float32)
        norms = [norm_at[self.T - 1 - lag] for lag in time_lags(self.T)]
        device = norms[0].device  # fills, not a host copy: no sync
        head = [torch.full((), float(self.index), device=device), torch.full((), float(self.T), device=device)]
        return torch.stack(head + norms)


class TimeHooks(SampledHooks):
    """The through-time probes of one model: hooked before a sampled step's forward, collected at `step()`."""

    def __init__(self, modules: list[tuple[str, nn.Module]], device: torch.device):
        super().__init__()
        self.names = [n for n, _ in modules]
        self._modules = [m for _, m in modules]
        self._device = device
        self._probed: list[Tensor] = []

    def _register(self) -> list[RemovableHandle]:
        """A forward hook on every recurrent module."""
        return [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self._modules)]

    def _hook(self, index: int):
        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            y = out[0] if isinstance(out, tuple) else out
            # Only training forwards count, and only a gradient that reaches the output can be followed.
            if not torch.is_grad_enabled() or not isinstance(y, Tensor) or not y.requires_grad:
                return
            probe = _probe(index, m, args, kwargs)
            if probe is not None:
                y.register_hook(lambda grad: self._probed.append(probe.row(grad).to(self._device)))
        return hook

    def _rows(self) -> list[tuple[str, Tensor]]:
        """The step's `time_grad` row (of the call whose gradient fell most through time, if the modules
        ran several times), or none if no gradient came back."""
        rows, self._probed = self._probed, []
        if not rows:
            return []
        r = torch.stack(rows)
        lag0, first = TIME_FIELDS.index("grad_lag0"), len(TIME_FIELDS) - 1
        ratio = torch.nan_to_num(r[:, first] / r[:, lag0], nan=math.inf)  # NaN (non-finite) is never the pick
        return [("time_grad", r.index_select(0, torch.argmin(ratio).reshape(1))[0])]  # a device index: no sync


def _probe(index: int, m: nn.Module, args: tuple, kwargs: dict) -> Optional[_Probe]:
    """Re-run `m` on its input cut after the measured positions; None where it is not measured."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(x, Tensor) or not any(p.requires_grad for p in m.parameters()):
        return None  # a PackedSequence, or a module that does not train
    time_dim = 0 if x.dim() == 2 or not getattr(m, "batch_first", False) else 1
    T = x.shape[time_dim]
    if T < 2:
        return None
    # The base class's forward: no hooks fire, and a subclass's own interface (e.g. LSTMAsRNN) is bypassed.
    forward = cast(Callable[..., tuple[Tensor, Any]], next(c for c in _RECURRENT if isinstance(m, c)).forward)
    state = _initial_state(m, hx)
    cuts = sorted({T - 1 - lag for lag in time_lags(T)} - {T - 1})
    x = x.detach()
    states: list[Tensor] = []
    was_training = m.training
    m.train(False)  # no dropout between layers in the probe (the module's own flag, restored below)
    try:
        start = 0
        for p in cuts:
            _, state = forward(m, x.narrow(time_dim, start, p + 1 - start), state)
            states.extend(state if isinstance(state, tuple) else (state,))
            start = p + 1
        out, _ = forward(m, x.narrow(time_dim, start, T - start), state)
    finally:
        m.train(was_training)
    return _Probe(index, out.select(time_dim, -1), states, cuts, T, time_dim)


def _initial_state(m: nn.Module, hx: Any) -> Any:
    """The initial state as the base class's forward takes it, out of the caller's graph: an LSTM given
    a lone h (as `nn.RNN` takes it, e.g. graddoctor's `LSTMAsRNN`) starts its cell state at zero."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h.detach() for h in hx)
    if isinstance(m, nn.LSTM):
        return hx.detach(), hx.new_zeros(hx.shape[:-1] + (m.hidden_size,))
    return hx.detach()
