"""Shared pieces of the lab's experiments: data, tiny models, and a training loop recorded with `watch`.

Everything runs on the CPU with one thread per process: the lab must finish in
minutes on 2 shared cores, and one thread makes the numbers reproducible.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..core._compose import watch
from ..store._run import open_run

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
}


@functools.lru_cache(maxsize=1)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download
    d = load_digits()
    x = d.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardized pixels: 64 features
    return x, d.target.astype(np.int64)


def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 images, 64 standardized features, 10 classes) as tensors."""
    x, y = _digits_numpy()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def seed_all(seed: int) -> torch.Generator:
    """Seed torch's global generator and return a private one for batches."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def init_linear(lin: nn.Linear, scheme: str) -> None:
    """Initialize one Linear layer in place with torch.nn.init.

    Args:
      scheme: "default" (PyTorch's), "xavier" (std sqrt(1/n_in), as He et al. 2015 call Xavier for square
        layers), "xavier_glorot" (sqrt(2/(n_in+n_out))), "he" (std sqrt(2/n_in)), "small" (std 0.01),
        "large" (std 3 sqrt(2/n_in)).
    References:
      Glorot & Bengio 2010; He et al. 2015, "Delving Deep into Rectifiers", https://arxiv.org/abs/1502.01852
    """
    n_in = lin.weight.shape[1]
    if scheme == "default":
        return
    std = {"xavier": math.sqrt(1.0 / n_in), "he": math.sqrt(2.0 / n_in), "small": 0.01,
           "large": 3.0 * math.sqrt(2.0 / n_in),
           "xavier_glorot": math.sqrt(2.0 / (n_in + lin.weight.shape[0]))}[scheme]
    with torch.no_grad():
        nn.init.normal_(lin.weight, 0.0, std)
        nn.init.zeros_(lin.bias)


def mlp(sizes: list[int], activation: str, init: str = "default") -> nn.Sequential:
    """Linear layers of `sizes`, each but the last followed by the activation."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        init_linear(lin, init)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def train(model: nn.Module, run_dir: Path, steps: int, batch: Callable[[int], tuple[Tensor, Tensor]],
          loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
          before_step: Optional[Callable] = None, activation_every: int = 10, sample_every: int = 5,
          stop_on_nonfinite: bool = True, guard=None) -> None:
    """Train `model` for `steps` steps, every step recorded with `graddoctor.watch` into `run_dir`.

    Args:
      batch: step -> (inputs, targets).
      before_step: optional `fn(watch, step, loss)` called after `w.step(loss)` and before
        `optimizer.step()`; a remedy (clipping) goes here and may record an event. If it returns
        False the optimizer step is skipped.
      stop_on_nonfinite: end the run at the first NaN/Inf loss (one more step records nothing new).
      guard: a `graddoctor.treat` gradient transform, run by watch on every step (clipping, skipping).
    """
    extra = {"guard": guard} if guard is not None else {}
    # live_diagnosis off: the lab diagnoses every run once it is recorded (faster, same findings).
    with watch(model, optimizer, run_dir, overwrite=True, flush_every=50, live_diagnosis=False,
               activation_every=activation_every, sample_every=sample_every, **extra) as w:
        for step in range(steps):
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            w.step(loss)
            go = before_step(w, step, loss) if before_step is not None else True
            if go is not False:
                optimizer.step()
            # note: a host sync on the CPU costs nothing; it stops a diverged run early.
            if stop_on_nonfinite and not math.isfinite(float(loss.detach())):
                break


def sampler(x: Tensor, y: Tensor, batch_size: int, gen: torch.Generator) -> Callable[[int], tuple[Tensor, Tensor]]:
    """step -> a random mini-batch drawn with `gen` (deterministic for a seed)."""
    def batch(_step: int) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        return x[idx], y[idx]
    return batch


def losses(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, loss) as recorded by watch."""
    with open_run(run_dir) as run:
        return run.loss()


def tail_mean(values: np.ndarray, frac: float = 0.1) -> float:
    """Mean of the last `frac` of a series (at least 1 value); NaN/Inf propagate (a diverged run stays diverged)."""
    if len(values) == 0:
        return math.nan
    k = max(1, int(round(len(values) * frac)))
    return float(np.mean(values[-k:]))


def layer_profile(run_dir: Path, steps: Optional[list[int]] = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-layer gradient norms (modules owning parameters, input first).

    Returns:
      (layer names, recorded steps [T], grad norms [T, L]).
    """
    with open_run(run_dir) as run:
        names = run.layers
        hs = [run.layer_history(n) for n in names]
        return names, hs[0].steps, np.stack([h.grad_norm for h in hs], axis=1)


def first_last_ratio(run_dir: Path) -> float:
    """Median over steps of the first layer's gradient norm over the last layer's."""
    _, _, g = layer_profile(run_dir)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nanmedian(g[:, 0] / g[:, -1]))
