"""`graddoctor demo`: the vanishing gradient of a deep sigmoid MLP next to a healthy ReLU/He MLP.

Both nets see the same synthetic classification task (no download) and are
recorded with `watch`. The printed ratio is the first layer's gradient norm
over the last layer's: the product of sigmoid derivatives (each at most 0.25)
makes it tiny for the sigmoid net, while the ReLU net with He init keeps it
near 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core._compose import watch
from ..report._summary import format_summary
from ..store._run import open_run


def make_mlp(depth: int, width: int, activation: type[nn.Module], init: str, n_in: int = 32,
             n_out: int = 4) -> nn.Sequential:
    """A plain MLP of `depth` Linear layers; init is 'he' or 'default'."""
    sizes = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(sizes[i], sizes[i + 1])
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < depth - 1:
            layers.append(activation())
    return nn.Sequential(*layers)


def synthetic_task(n: int = 512, n_in: int = 32, n_out: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    teacher = torch.randn(n_in, n_out, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def train(model: nn.Module, run_dir: Path, steps: int, seed: int, lr: float = 0.05) -> None:
    torch.manual_seed(seed)
    x, y = synthetic_task(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with watch(model, opt, run_dir, overwrite=True, flush_every=20) as w:
        for step in range(steps):
            idx = torch.randint(0, len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()


def first_last_ratio(run_dir: Path) -> float:
    """Median over steps of |grad| of the first Linear layer over that of the last."""
    with open_run(run_dir) as run:
        first, last = run.layer_history(run.layers[0]), run.layer_history(run.layers[-1])
        return float(np.median(first.grad_norm / last.grad_norm))


def run_demo(out: Path, steps: int = 60, depth: int = 10, seed: int = 0) -> str:
    """Train both nets, return the text to print."""
    torch.manual_seed(seed)
    nets = {"sigmoid": make_mlp(depth, 32, nn.Sigmoid, "default"), "relu_he": make_mlp(depth, 32, nn.ReLU, "he")}
    parts = []
    for name, model in nets.items():
        run_dir = out / name
        train(model, run_dir, steps, seed)
        with open_run(run_dir) as run:
            parts.append(format_summary(run))
        parts.append(f"first/last layer gradient-norm ratio ({name}, {depth} layers): "
                     f"{first_last_ratio(run_dir):.3g}\n")
    return "\n".join(parts)
