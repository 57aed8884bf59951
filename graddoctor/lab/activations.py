"""Activation x depth on scikit-learn's digits: where the gradient vanishes, layer by layer.

Sigmoid and tanh nets get Xavier initialization, the one derived for them;
the ReLU family gets He initialization. Each net is trained with SGD and
recorded with `watch`; we compare the first layer's gradient norm with the
last layer's (median over steps) and the training loss.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..report import _plots as P
from ..report._views import heatmap_figure
from ._train import digits, first_last_ratio, layer_profile, losses, mlp, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "activations"
ACTS = ["sigmoid", "tanh", "relu", "leaky_relu", "elu"]
INIT = {"sigmoid": "xavier_glorot", "tanh": "xavier_glorot", "relu": "he", "leaky_relu": "he", "elu": "he"}


def _depths(preset: str) -> list[int]:
    return {"quick": [3, 10], "default": [2, 5, 10], "full": [2, 5, 10, 20]}[preset]


@experiment(NAME, "Activation x depth (digits)",
            "Saturating activations (sigmoid, derivative <= 0.25) make the gradient shrink geometrically toward "
            "the input as depth grows; ReLU, LeakyReLU and ELU keep it of the same order in every layer.",
            "seeds 000/001/003; Glorot & Bengio 2010", runs=lambda preset: len(ACTS) * len(_depths(preset)), order=10)
def run(ctx: Context):
    depths, steps = _depths(ctx.preset), ctx.pick(60, 150, 400)
    x, y = digits()
    ratio, final, run_of = {}, {}, {}
    for depth in depths:
        for act in ACTS:
            gen = seed_all(ctx.seed + depth)
            model = mlp([64] + [32] * (depth - 1) + [10], act, INIT[act])
            run_dir = ctx.run_dir(NAME, f"{act}_d{depth}")
            train(model, run_dir, steps, sampler(x, y, 64, gen), nn.functional.cross_entropy,
                  torch.optim.SGD(model.parameters(), lr=0.05))
            key = f"{act}/{depth}"
            ratio[key], final[key], run_of[key] = first_last_ratio(run_dir), tail_mean(losses(run_dir)[1]), run_dir
            ctx.tick(f"{NAME}/{act}/depth {depth}")
    deep = depths[-1]
    m = {"depths": depths, "first_over_last_grad_ratio": ratio, "final_loss": final, "deepest": deep}
    ok = (ratio[f"sigmoid/{deep}"] < 1e-3
          and all(0.1 < ratio[f"{a}/{deep}"] < 10 for a in ("relu", "leaky_relu", "elu"))
          and ratio[f"sigmoid/{deep}"] < ratio[f"sigmoid/{depths[0]}"])
    measured = (f"first/last layer gradient ratio at depth {deep}: " +
                ", ".join(f"{a} {ratio[f'{a}/{deep}']:.2g}" for a in ACTS) +
                f"; final loss sigmoid {final[f'sigmoid/{deep}']:.2f} vs ReLU {final[f'relu/{deep}']:.2f}.")
    return result(NAME, measured, ok, m, _figures(depths, run_of, ratio), list(run_of.values()), ctx,
                  rule=("at the deepest depth the sigmoid net's first/last ratio is < 1e-3 and ReLU, LeakyReLU and "
                        'ELU are within 0.1..10; the sigmoid ratio is smaller than at the shallowest depth.'))


def _figures(depths: list[int], run_of: dict, ratio: dict) -> list[Figure]:
    deep = depths[-1]
    fig, axes = P.figure(2)
    rows = {}
    for act in ACTS:
        _, _, g = layer_profile(run_of[f"{act}/{deep}"])
        rows[act] = np.nanmedian(g, axis=0)
    P.profiles(axes[0], [str(i) for i in range(deep)], rows,
               f"per-layer gradient norm, depth {deep} (median over steps)")
    P.loss_curve(axes[1], {a: losses(run_of[f"{a}/{deep}"]) for a in ACTS}, f"training loss, depth {deep}",
                 ylabel="cross-entropy (nats)")
    figs = [Figure(f"Gradient profiles and training curves at depth {deep}", P.to_uri(fig))]
    fig, axes = P.figure(1, width=5.5)
    P.bars(axes[0], [str(d) for d in depths], {a: [ratio[f"{a}/{d}"] for d in depths] for a in ACTS},
           "first-layer / last-layer gradient norm", "ratio (log; 1 = no vanishing)", log=True)
    axes[0].set_xlabel("depth (Linear layers)")
    axes[0].axhline(1.0, color="black", linewidth=0.7)
    figs.append(Figure("Gradient ratio vs depth", P.to_uri(fig)))
    figs.append(heatmap_figure(run_of[f"sigmoid/{deep}"], f"gradient flow, sigmoid depth {deep}"))
    figs.append(heatmap_figure(run_of[f"relu/{deep}"], f"gradient flow, ReLU + He depth {deep}"))
    return figs
