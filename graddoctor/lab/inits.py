"""Initialization on a 30-layer ReLU MLP: small, Xavier, He, large and LSUV.

He et al. (2015, fig. 3): with Xavier's sqrt(1/n) a 30-layer ReLU net does not
train (each ReLU halves the variance, so signal and gradient shrink by 2^-15),
while sqrt(2/n) trains. Small weights vanish faster still; large ones explode
at the first step. LSUV rescales orthogonal weights so each layer's output has
unit variance on a batch, and trains like He.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..report import _plots as P
from ..report._views import heatmap_figure
from ._train import digits, layer_profile, losses, mlp, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "init"
SCHEMES = ["small", "xavier", "he", "large", "lsuv"]
DEPTH, WIDTH = 30, 64


def _model(scheme: str, x: torch.Tensor) -> nn.Sequential:
    """The 30-layer ReLU MLP initialized with `scheme` (graddoctor.treat.init for Xavier, He and LSUV)."""
    from ..treat import init as gd_init
    model = mlp([64] + [WIDTH] * (DEPTH - 1) + [10], "relu", scheme if scheme in ("small", "large") else "default")
    if scheme == "xavier":  # the paper's Xavier: std sqrt(1/n) = sqrt(2/(n_in+n_out)) with gain 1
        gd_init.xavier_(model, nonlinearity="linear")
    elif scheme == "he":
        gd_init.he_(model)
    elif scheme == "lsuv":
        gd_init.lsuv_(model, x[:256])
    return model


@experiment(NAME, "Initialization of a 30-layer ReLU MLP",
            "At 30 layers, Xavier's sqrt(1/n) stalls (the loss stays at ln 10) while He's sqrt(2/n) trains; too "
            "small weights vanish, too large explode; LSUV trains like He.",
            "He et al. 2015, fig. 3, https://arxiv.org/abs/1502.01852; Mishkin & Matas 2016",
            runs=lambda preset: len(SCHEMES), order=20)
def run(ctx: Context):
    steps = ctx.pick(200, 400, 400)
    x, y = digits()
    final, start, runs = {}, {}, {}
    for scheme in SCHEMES:
        gen = seed_all(ctx.seed)
        model = _model(scheme, x)
        run_dir = ctx.run_dir(NAME, scheme)
        train(model, run_dir, steps, sampler(x, y, 128, gen), nn.functional.cross_entropy,
              torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9))
        loss = losses(run_dir)[1]
        start[scheme], final[scheme], runs[scheme] = float(loss[0]), tail_mean(loss), run_dir
        ctx.tick(f"{NAME}/{scheme}")
    ln10 = float(np.log(10))
    m = {"initial_loss": start, "final_loss": final, "chance_loss_ln10": ln10, "steps": steps}
    ok = (final["xavier"] > 0.95 * ln10 and final["he"] < 0.75 * ln10 and final["lsuv"] < 0.75 * ln10
          and final["small"] > 0.95 * ln10 and not final["large"] < 0.95 * ln10)
    measured = ("mean loss over the last 10% of steps: " + ", ".join(f"{s} {final[s]:.3g}" for s in SCHEMES) +
                f" (chance ln 10 = {ln10:.3f}).")
    return result(NAME, measured, ok, m, _figures(runs), list(runs.values()), ctx,
                  notes=f"{DEPTH} Linear layers of width {WIDTH}, SGD lr 0.003 momentum 0.9, batch 128, digits, "
                        f"{steps} steps (also in the full preset: given about 800 steps, the Xavier net starts to "
                        "escape the plateau). 'large' is 3x He's standard deviation.",
                  rule=('final loss (mean of the last 10% of steps): Xavier and small > 0.95 ln 10; '
                        'He and LSUV < 0.75 ln 10; large not below 0.95 ln 10 (NaN counts as not below).'))


def _figures(runs: dict) -> list[Figure]:
    fig, axes = P.figure(2)
    P.loss_curve(axes[0], {s: losses(r) for s, r in runs.items()}, "training loss by initialization",
                 ylabel="cross-entropy (nats)", baseline=(float(np.log(10)), "chance (ln 10)"), log=True,
                 ylim=(0.05, 20.0))
    rows = {}
    for s, r in runs.items():
        _, _, g = layer_profile(r)
        rows[s] = g[0]
    P.profiles(axes[1], [str(i) for i in range(DEPTH)], rows, "per-layer gradient norm at step 0")
    return [Figure("Loss and step-0 gradient profile per initialization", P.to_uri(fig),
                   "Red triangles mark steps where the loss was NaN/Inf: the 'large' run starts far above the "
                   "plotted range and explodes. Missing points on the right are gradients that underflowed to 0."),
            heatmap_figure(runs["xavier"], "gradient flow, Xavier sqrt(1/n), 30 ReLU layers"),
            heatmap_figure(runs["he"], "gradient flow, He sqrt(2/n), 30 ReLU layers")]
