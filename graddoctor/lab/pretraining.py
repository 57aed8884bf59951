"""Greedy layer-wise pre-training + fine-tuning vs random initialization for a deep sigmoid net.

Pre-training (Hinton et al. 2006; Bengio et al. 2007), with `graddoctor.treat.layerwise_pretrain`:
train the first layer as a (denoising, tied-weight) autoencoder of the input, then the second as an
autoencoder of the first layer's codes, and so on; then fine-tune the whole net on the labels. We compare fine-tuning
from that start with training the same net from PyTorch's default random init, same
optimizer and steps, both recorded with `watch`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..report import _plots as P
from ..report._views import heatmap_figure
from ._train import digits, first_last_ratio, layer_profile, losses, mlp, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "pretraining"
SIZES = [64, 64, 64, 64, 64, 64, 10]  # 5 hidden sigmoid layers


@experiment(NAME, "Layer-wise pre-training vs random init (deep sigmoid)",
            "A deep sigmoid net trained from random weights barely moves (its gradient vanishes toward the input); "
            "greedy layer-wise pre-training then fine-tuning starts it in a region where it trains.",
            "seed 001; Hinton et al. 2006; Bengio et al. 2007", runs=lambda preset: 2, order=80)
def run(ctx: Context):
    steps, pre_steps = ctx.pick(200, 400, 1000), ctx.pick(150, 300, 600)
    x, y = digits()
    runs, recon = {}, []
    for label in ("random init", "pre-trained"):
        gen = seed_all(ctx.seed)
        model = mlp(SIZES, "sigmoid", "default")
        if label == "pre-trained":
            from ..treat import layerwise_pretrain
            recon = layerwise_pretrain(model, x, steps_per_layer=pre_steps, seed=ctx.seed)
        run_dir = ctx.run_dir(NAME, "pretrained" if label == "pre-trained" else "random")
        train(model, run_dir, steps, sampler(x, y, 64, gen), nn.functional.cross_entropy,
              torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
        runs[label] = run_dir
        ctx.tick(f"{NAME}/{label}")
    final = {k: tail_mean(losses(r)[1]) for k, r in runs.items()}
    ratio = {k: first_last_ratio(r) for k, r in runs.items()}
    m = {"final_loss": final, "first_over_last_grad_ratio": ratio, "reconstruction_mse": recon,
         "steps": steps, "pretrain_steps_per_layer": pre_steps}
    ok = final["pre-trained"] < 0.7 * final["random init"]
    measured = (f"fine-tuning loss after {steps} steps: {final['random init']:.3f} from random init, "
                f"{final['pre-trained']:.3f} after pre-training; first/last layer gradient ratio "
                f"{ratio['random init']:.2g} vs {ratio['pre-trained']:.2g}.")
    return result(NAME, measured, ok, m, _figures(runs), list(runs.values()), ctx,
                  notes=f"{len(SIZES) - 2} hidden layers of 64 sigmoids on digits; gd.treat.layerwise_pretrain with "
                        f"{pre_steps} Adam steps per layer; fine-tuning with SGD lr 0.5, momentum 0.9, batch 64.",
                  rule="the pre-trained net's final fine-tuning loss is < 0.7 x the random-init net's.")


def _figures(runs: dict) -> list[Figure]:
    fig, axes = P.figure(2)
    P.loss_curve(axes[0], {k: losses(r) for k, r in runs.items()}, "fine-tuning loss", ylabel="cross-entropy (nats)",
                 baseline=(float(np.log(10)), "chance (ln 10)"))
    rows = {}
    for k, r in runs.items():
        _, _, g = layer_profile(r)
        rows[k] = np.nanmedian(g, axis=0)
    P.profiles(axes[1], [str(i) for i in range(len(SIZES) - 1)], rows, "per-layer gradient norm (median over steps)")
    return [Figure("Random init vs layer-wise pre-training", P.to_uri(fig)),
            heatmap_figure(runs["random init"], "gradient flow, random init")]
