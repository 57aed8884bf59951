"""L1 and L2 weight penalties, to add to the loss.

    loss = loss_fn(model(x), y) + gd.treat.l2_penalty(model, 1e-4)

L2 penalty versus AdamW's decoupled weight decay:
- `l2_penalty(model, lam)` is `lam / 2 * sum ||w||^2`, whose gradient is `lam * w`. With SGD
  this is exactly `SGD(weight_decay=lam)`: the step is `w -= lr * (g + lam * w)`.
- With Adam the penalty's gradient `lam * w` is divided by `sqrt(v)` like every gradient, so
  weights with large gradient history are barely decayed; `Adam(weight_decay=lam)` does the same
  (it is coupled L2). AdamW decouples the decay from the adaptive step:
  `w -= lr * (m_hat / (sqrt(v_hat) + eps) + lam * w)`, every weight shrinks at the same rate,
  which regularizes better (Loshchilov & Hutter). With Adam, prefer `AdamW(weight_decay=...)`
  to this penalty; note that AdamW's `lam` is multiplied by `lr`, so values are not interchangeable.

References:
  Loshchilov, Hutter, "Decoupled Weight Decay Regularization", ICLR 2019. https://arxiv.org/abs/1711.05101
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ._base import check_positive


def _weights(model: nn.Module | Iterable[Tensor], include_bias: bool) -> list[Tensor]:
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    return [p for p in params if p.requires_grad and (include_bias or p.ndim >= 2)]


def _penalty(model: nn.Module | Iterable[Tensor], coef: float, include_bias: bool,
             term: Callable[[Tensor], Tensor], scale: float = 1.0) -> Tensor:
    """`scale * coef * sum(term(w))` over the penalized weights; a 0-d zero when there are none."""
    c = scale * check_positive("coef", coef, allow_zero=True)
    ws = _weights(model, include_bias)
    if not ws:
        return torch.zeros(())
    return c * torch.stack([term(w) for w in ws]).sum()


def l1_penalty(model: nn.Module | Iterable[Tensor], coef: float, include_bias: bool = False) -> Tensor:
    """`coef * sum |w|` over the weights (matrices and kernels; biases and norm gains too if `include_bias`).

    Its gradient is `coef * sign(w)`: it drives small weights to exactly zero (sparsity).

    Args:
      model: a module or an iterable of parameters.
      coef: the penalty strength.
      include_bias: also penalize 1-D parameters (biases, norm gains).
    Returns:
      A 0-d tensor to add to the loss (no host sync).
    """
    return _penalty(model, coef, include_bias, lambda w: w.abs().sum())


def l2_penalty(model: nn.Module | Iterable[Tensor], coef: float, include_bias: bool = False) -> Tensor:
    """`coef / 2 * sum ||w||^2`, so its gradient is `coef * w` (SGD's `weight_decay=coef` exactly).

    Args:
      model: a module or an iterable of parameters.
      coef: the penalty strength (the weight-decay coefficient).
      include_bias: also penalize 1-D parameters (biases, norm gains).
    Returns:
      A 0-d tensor to add to the loss (no host sync).
    """
    return _penalty(model, coef, include_bias, lambda w: w.square().sum(), scale=0.5)
