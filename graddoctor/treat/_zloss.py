"""z-loss: a penalty on the softmax normalizer of the output logits, to add to the loss.

    logits = model(x)                       # [batch, time, vocab]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) + gd.treat.z_loss(logits)

Softmax ignores a shift of the logits, so log Z = logsumexp(logits) is free to drift during
training; far from 0 the logits lose precision and the loss can diverge (output logit divergence).
z-loss adds `coef * mean(log(Z)^2)`, which holds log Z near 0 and leaves the softmax unchanged.

References:
  Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", 2022, sec. 5 (coef 1e-4).
  Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities", 2023, sec. 3.1.2.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._errors import ConfigError
from ._base import check_positive


def z_loss(logits: Tensor, coef: float = 1e-4) -> Tensor:
    """`coef * mean(logsumexp(logits, -1) ** 2)` over every position, as a 0-d tensor in the logits' graph.

    Args:
      logits: the output logits, classes (the vocabulary) in the last dimension.
      coef: the weight; PaLM used 1e-4.
    Returns:
      The penalty, to add to the loss (computed in float32 at least, so bfloat16 logits do not round it).
    """
    c = check_positive("coef", coef, allow_zero=True)
    if not isinstance(logits, Tensor) or logits.dim() < 1 or logits.shape[-1] < 1:
        raise ConfigError(f"logits={type(logits).__name__} is not allowed: use a tensor with the classes in its "
                          "last dimension")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return c * torch.logsumexp(logits.to(dtype), dim=-1).square().mean()
