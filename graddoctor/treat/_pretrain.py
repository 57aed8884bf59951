"""Greedy layer-wise pre-training (stacked denoising autoencoders, tied weights), then fine-tuning.

    gd.treat.layerwise_pretrain(model, x_train, steps_per_layer=200)
    gd.treat.fine_tune(model, x_train, y_train, steps=500)

The seeds' first cure for vanishing gradients (Hinton 2006; Bengio et al. 2007): train one
hidden layer at a time as an autoencoder of the layer below, so each stage is shallow and
its gradient does not vanish; then train the whole net on the supervised task.

For hidden layer k (every Linear but the last) with input h (the already pre-trained layers
applied to the data, no gradient), the autoencoder is
  a = post_k(W h~ + b)    (h~: h with a fraction `noise` of its entries set to zero)
  r = W^T a + c           (tied weights: the decoder is the encoder's transpose)
and minimizes the mean squared error ||r - h||^2. `post_k` is whatever follows the Linear
in the Sequential up to the next Linear (usually its activation). Only W and b are kept.

References:
  Hinton, Osindero, Teh, "A fast learning algorithm for deep belief nets", 2006.
  Bengio, Lamblin, Popovici, Larochelle, "Greedy Layer-Wise Training of Deep Networks", NIPS 2007.
  Vincent, Larochelle, Bengio, Manzagol, "Extracting and composing robust features with denoising
    autoencoders", ICML 2008.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .._errors import GradDoctorError
from ._base import check_positive


class PretrainError(GradDoctorError):
    """The model is not an MLP that layer-wise pre-training can handle."""


def _stages(model: nn.Module) -> list[tuple[nn.Linear, nn.Sequential]]:
    """(Linear, what follows it up to the next Linear) for each Linear of a Sequential MLP."""
    if not isinstance(model, nn.Sequential):
        raise PretrainError(f"layer-wise pre-training needs an nn.Sequential MLP, got {type(model).__name__}")
    stages: list[tuple[nn.Linear, list[nn.Module]]] = []
    for m in model:
        if isinstance(m, nn.Linear):
            stages.append((m, []))
        elif not stages:
            raise PretrainError(f"the Sequential starts with {type(m).__name__}; it must start with a Linear layer")
        elif any(isinstance(x, (nn.Linear, nn.modules.conv._ConvNd)) for x in m.modules()):
            raise PretrainError(f"{type(m).__name__} holds weight layers; only flat Linear MLPs are supported")
        else:
            stages[-1][1].append(m)
    if len(stages) < 2:
        raise PretrainError(f"the model has {len(stages)} Linear layer(s); pre-training needs hidden layers (>= 2)")
    return [(lin, nn.Sequential(*post)) for lin, post in stages]


def _batches(data: Tensor | Iterable, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Endless input batches: random rows of a tensor, or a loader's batches over and over (first item of tuples)."""
    if isinstance(data, Tensor):
        while True:
            yield data[torch.randint(0, len(data), (batch_size,), generator=gen)]
    while True:
        seen = False
        for b in data:
            seen = True
            yield b[0] if isinstance(b, (tuple, list)) else b
        if not seen:
            raise PretrainError("the data iterable is empty")


def layerwise_pretrain(model: nn.Sequential, data: Tensor | Iterable, steps_per_layer: int = 200, noise: float = 0.2,
                       lr: float = 1e-2, batch_size: int = 64, seed: int = 0) -> list[float]:
    """Pre-train every hidden Linear of `model` as a tied-weight denoising autoencoder, greedily.

    Args:
      model: an `nn.Sequential` of Linear layers and activations (changed in place).
      data: inputs, a tensor [N, features] or an iterable of batches (tensors or (x, y) tuples).
      steps_per_layer: Adam steps for each autoencoder.
      noise: fraction of input entries zeroed (masking noise); 0 gives a plain autoencoder.
      lr: Adam learning rate.
      batch_size: rows per step when `data` is a tensor.
      seed: seeds the batches and the noise.
    Returns:
      The final reconstruction loss of each hidden layer's autoencoder.
    """
    if not isinstance(steps_per_layer, int) or steps_per_layer < 1:
        raise PretrainError(f"steps_per_layer={steps_per_layer!r} is not allowed: use an integer >= 1")
    if not 0 <= noise < 1:
        raise PretrainError(f"noise={noise!r} is not allowed: use a fraction in [0, 1)")
    check_positive("lr", lr)
    stages = _stages(model)
    gen = torch.Generator().manual_seed(seed)
    batches = _batches(data, batch_size, gen)
    below: list[nn.Module] = []
    losses = []
    for lin, post in stages[:-1]:
        losses.append(_train_autoencoder(lin, post, nn.Sequential(*below), batches, steps_per_layer, noise, lr, gen))
        below += [lin, post]
    return losses


def _train_autoencoder(lin: nn.Linear, post: nn.Module, below: nn.Module, batches: Iterator[Tensor], steps: int,
                       noise: float, lr: float, gen: torch.Generator) -> float:
    """Train (W, b) of `lin` with a tied decoder (W^T, c) to reconstruct the output of `below`.

    The autoencoder sees its input standardized per feature (deep sigmoid outputs vary little,
    and on raw values the mean alone would be a good reconstruction, teaching the layer nothing);
    the standardization is then folded into W and b, so the layer takes the raw input.
    """
    with torch.no_grad():
        sample = below(torch.cat([next(batches) for _ in range(8)]).to(lin.weight.device))
        mean, std = sample.mean(0), sample.std(0).clamp_min(1e-3)
    c = torch.zeros(lin.in_features, device=lin.weight.device, requires_grad=True)
    opt = torch.optim.Adam([lin.weight, c] + ([lin.bias] if lin.bias is not None else []), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        x = next(batches).to(lin.weight.device)
        with torch.no_grad():
            h = (below(x) - mean) / std
            keep = (torch.rand(h.shape, generator=gen) >= noise).to(h.device, h.dtype)
        a = post(lin(h * keep))
        r = nn.functional.linear(a, lin.weight.t(), c)
        loss = nn.functional.mse_loss(r, h)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardization: W (h - mean) / std + b == (W / std) h + (b - W mean / std)
        w = lin.weight / std
        if lin.bias is not None:
            lin.bias.sub_(w @ mean)
        lin.weight.copy_(w)
    return float(loss.detach())


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, steps: int = 500, lr: float = 1e-3, batch_size: int = 64,
              loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy, seed: int = 0,
              optimizer: Optional[torch.optim.Optimizer] = None) -> list[float]:
    """Supervised training of the whole net (the second phase after `layerwise_pretrain`).

    Args:
      model: the (pre-trained) model.
      x, y: training inputs and targets.
      steps: optimizer steps on random mini-batches.
      lr: Adam learning rate (ignored if `optimizer` is given).
      batch_size: rows per step.
      loss_fn: the supervised loss.
      seed: seeds the mini-batch draws.
      optimizer: use this optimizer instead of a fresh Adam.
    Returns:
      The training loss of every step.
    """
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses)] if losses else []
