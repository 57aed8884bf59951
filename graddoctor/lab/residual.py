"""Residual vs plain networks at increasing depth (He et al. 2016, the degradation problem).

Both nets are stacks of two-layer blocks, Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm,
as in the paper's basic block; the residual net adds the block's input before the last ReLU.
Trained on digits with SGD + momentum for the same number of steps, the deeper plain net
ends with a higher training loss than the shallower one, and the residual net does not.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..report import _plots as P
from ..report._views import heatmap_figure
from ._train import digits, layer_profile, losses, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "residual"
WIDTH = 32


class Block(nn.Module):
    """Two Linear layers with BatchNorm; `residual` adds the input (identity shortcut) before the last ReLU."""

    def __init__(self, width: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.f = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(),
                               nn.Linear(width, width), nn.BatchNorm1d(width))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.f(x) if self.residual else self.f(x))


def net(blocks: int, residual: bool) -> nn.Sequential:
    """Input layer, `blocks` two-layer blocks, output layer: 2 * blocks + 2 Linear layers."""
    return nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), *[Block(WIDTH, residual) for _ in range(blocks)],
                         nn.Linear(WIDTH, 10))


def _blocks(preset: str) -> list[int]:
    return {"quick": [2, 14], "default": [2, 8, 20], "full": [2, 8, 20, 40]}[preset]


@experiment(NAME, "Residual vs plain at increasing depth",
            "A deeper plain network reaches a higher training loss than a shallower one (degradation), even with "
            "BatchNorm; identity shortcuts remove the degradation (after full training the deeper residual net is "
            "even better; in our short CPU runs we ask that it beat the deep plain net by at least 2x).",
            "He et al. 2016, fig. 1 and 4, https://arxiv.org/abs/1512.03385",
            runs=lambda preset: 2 * len(_blocks(preset)), order=40)
def run(ctx: Context):
    blocks, steps = _blocks(ctx.preset), ctx.pick(150, 300, 600)
    x, y = digits()
    final, runs = {}, {}
    for b in blocks:
        for kind in ("plain", "residual"):
            gen = seed_all(ctx.seed)
            model = net(b, kind == "residual")
            run_dir = ctx.run_dir(NAME, f"{kind}_{2 * b + 2}")
            train(model, run_dir, steps, sampler(x, y, 64, gen), nn.functional.cross_entropy,
                  torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))
            final[f"{kind}/{2 * b + 2}"], runs[f"{kind}/{2 * b + 2}"] = tail_mean(losses(run_dir)[1], 0.2), run_dir
            ctx.tick(f"{NAME}/{kind}/{2 * b + 2} layers")
    depths = [2 * b + 2 for b in blocks]
    lo, hi = depths[0], depths[-1]
    m = {"depths": depths, "final_loss": final, "steps": steps}
    ok = final[f"plain/{hi}"] > final[f"plain/{lo}"] and final[f"residual/{hi}"] < 0.5 * final[f"plain/{hi}"]
    measured = ("mean training loss over the last 20% of steps: " +
                ", ".join(f"{d} layers plain {final[f'plain/{d}']:.3f} / residual {final[f'residual/{d}']:.3f}"
                          for d in depths) + ".")
    return result(NAME, measured, ok, m, _figures(runs, depths), list(runs.values()), ctx,
                  notes=f"MLP blocks of width {WIDTH} on digits instead of CIFAR-10 convolutions; SGD lr 0.02, "
                        f"momentum 0.9, batch 64, {steps} steps.",
                  rule=("the deepest plain net's loss is above the shallowest plain net's, and the deepest residual "
                        "net's is below half the deepest plain net's."))


def _figures(runs: dict, depths: list[int]) -> list[Figure]:
    fig, axes = P.figure(2)
    for ax, kind in zip(axes, ("plain", "residual")):
        P.loss_curve(ax, {f"{d} layers": losses(runs[f"{kind}/{d}"]) for d in depths}, f"{kind} nets",
                     ylabel="cross-entropy (nats)", log=True)
    figs = [Figure("Training loss of plain and residual nets by depth", P.to_uri(fig),
                   "Left: the deeper plain net trains worse (degradation). Right: with shortcuts depth helps.")]
    fig, axes = P.figure(1, width=5.5)
    hi = depths[-1]
    rows = {}
    for kind in ("plain", "residual"):
        _, _, g = layer_profile(runs[f"{kind}/{hi}"])
        rows[kind] = g[0]
    P.profiles(axes[0], [str(i) for i in range(len(rows["plain"]))], rows,
               f"per-module gradient norm at step 0, {hi} layers")
    axes[0].set_xlabel("parameter-owning module index (Linear and BatchNorm; 0 = input side)")
    figs.append(Figure("Gradient profile at step 0", P.to_uri(fig)))
    figs.append(heatmap_figure(runs[f"plain/{hi}"], f"gradient flow, plain {hi} layers"))
    return figs
