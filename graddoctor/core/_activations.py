"""Activation and input-batch statistics, computed on the device; nothing syncs.

The hooks that gather activation rows exist only on sampled steps (`_act_hooks`). What
counts as an activation is `_layers.activation_sites`: activation modules found by class
or by behaviour, recurrent layers (their outputs are bounded by tanh for RNN/LSTM/GRU), and
the functional activation of torch's Transformer layers. Other activations written as
function calls inside `forward` (e.g. `F.gelu(x)`) have no module to hook and are not seen.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..store._series import INPUT_FIELDS  # the column order of an input row
from . import _native
from ._layers import ActivationKind


def _unit_dim(x: Tensor) -> int:
    # [B, T, F] sequences keep units last; [B, F] and [B, C, H, W] keep them in dim 1.
    return x.ndim - 1 if x.ndim == 3 else 1


def activation_row(output: Tensor, kind: ActivationKind, saturation_margin: float) -> Tensor:
    """One row of `ACT_FIELDS` for an activation output, on its device. No host sync.

    Saturated means within `saturation_margin * (hi - lo)` of a bound (sigmoid:
    below 0.01 or above 0.99 at the default 0.01), where the derivative is tiny.
    A dead unit is one feature that is exactly zero over the whole batch.
    """
    x = output.detach().float()
    nan = x.new_full((), math.nan)
    nonfinite = torch.count_nonzero(x * 0).float()
    mean, std = (x.mean(), x.std()) if x.numel() > 1 else (x.mean(), nan)
    frac_zero = (x == 0).float().mean()
    if kind.bounds is not None:
        lo, hi = kind.bounds
        margin = saturation_margin * (hi - lo)
        frac_sat = ((x <= lo + margin) | (x >= hi - margin)).float().mean()
    else:
        frac_sat = nan
    if x.ndim >= 2:
        d = _unit_dim(x)
        alive = (x != 0).transpose(0, d).reshape(x.shape[d], -1).any(dim=1)
        frac_dead = 1.0 - alive.float().mean()
    else:
        frac_dead = nan
    return torch.stack([mean, std, frac_sat, frac_zero, frac_dead, nonfinite])


def input_row(x: Tensor) -> Tensor:
    """One row of `INPUT_FIELDS` for an input batch, on its device. No host sync."""
    x = x.detach()
    if x.device.type == "cpu":  # the native kernel: all four from one read, no temporaries
        row = _native.input_row(x)  # None where the kernel cannot read x (then the PyTorch ops below)
        if row is not None:
            return row
    x = x if x.dtype == torch.float32 else x.float()
    if x.numel() == 0:
        return x.new_full((len(INPUT_FIELDS),), math.nan)
    maxabs = torch.maximum(x.amax(), x.amin().neg())  # NaN if the batch holds a NaN
    if x.device.type == "cpu" and bool(torch.isfinite(maxabs)):
        nonfinite = x.new_zeros(())  # CPU: reading maxabs waits for no device; finite means no NaN/Inf
    else:
        nonfinite = torch.count_nonzero(x * 0).float()
    std = x.std() if x.numel() > 1 else x.new_full((), math.nan)
    return torch.stack([maxabs, nonfinite, x.mean(), std])


def first_tensor(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The training batch of a forward call: its first argument (the first keyword argument when
    there is no positional one, as in `model(input_ids=...)`), if that is a floating-point tensor.

    Only the first argument: a recurrent model called as `model(x, hidden)` must never have its
    own carried state read as data (a NaN hidden state is the model's, not the batch's). An
    integer first argument holds token indices: it has no scale, can hold no NaN, and an index out
    of range stops the forward at once (nn.Embedding raises before any step is recorded), so it
    gives no input row at all.
    """
    first = args[0] if args else next(iter(kwargs.values()), None)
    return first if isinstance(first, Tensor) and first.is_floating_point() else None
