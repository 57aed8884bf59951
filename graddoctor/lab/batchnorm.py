"""BatchNorm on a deep sigmoid net (Ioffe & Szegedy 2015, fig. 1, CPU-sized).

Three hidden layers of 100 sigmoid units on digits (instead of MNIST), with and
without BatchNorm before each sigmoid (inserted by `graddoctor.treat.surgery.add_norm`
into the same initial net), same SGD settings. We track the 15th,
50th and 85th percentiles of the input to the last hidden sigmoid over
training (the paper's fig. 1b/c) and the sigmoid outputs' saturation.
"""
from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from ..report import _plots as P
from ._train import digits, losses, mlp, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "batchnorm"
QUANTILES = (0.15, 0.5, 0.85)


class PreActivationProbe:
    """Forward pre-hook on a sigmoid that keeps the 15/50/85th percentiles of its input at each training forward."""

    def __init__(self, module: nn.Module):
        self.rows: list[list[float]] = []
        self.last_output: np.ndarray = np.zeros(0)
        self._h = module.register_forward_pre_hook(self._pre)
        self._o = module.register_forward_hook(self._post)

    def _pre(self, _m, args) -> None:
        if torch.is_grad_enabled():
            self.rows.append(torch.quantile(args[0].detach().float().flatten(), torch.tensor(QUANTILES)).tolist())

    def _post(self, _m, _args, out) -> None:
        if torch.is_grad_enabled():
            self.last_output = out.detach().numpy().ravel().copy()

    def remove(self) -> None:
        self._h.remove()
        self._o.remove()


def _train_one(ctx: Context, bn: bool, steps: int) -> tuple:
    x, y = digits()
    gen = seed_all(ctx.seed)
    model = mlp([64, 100, 100, 100, 10], "sigmoid", "default")
    if bn:  # the cure as model surgery: BatchNorm1d inserted before each sigmoid, same Linear weights
        from ..treat.surgery import add_norm
        model = cast(nn.Sequential, add_norm(model, "batch")[0])  # a Sequential stays a Sequential
    sigmoids = [m for m in model if isinstance(m, nn.Sigmoid)]
    probe = PreActivationProbe(sigmoids[-1])
    outputs: dict[int, np.ndarray] = {}
    hooks = [s.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().numpy().ravel().copy()))
             for i, s in enumerate(sigmoids)]
    run_dir = ctx.run_dir(NAME, "batchnorm" if bn else "plain")
    train(model, run_dir, steps, sampler(x, y, 60, gen), nn.functional.cross_entropy,
          torch.optim.SGD(model.parameters(), lr=0.5))
    probe.remove()
    for h in hooks:
        h.remove()
    ctx.tick(f"{NAME}/{'bn' if bn else 'plain'}")
    return run_dir, np.array(probe.rows), outputs


@experiment(NAME, "BatchNorm on a deep sigmoid net",
            "With BatchNorm the 3x100 sigmoid net trains faster, and the distribution of inputs to a sigmoid "
            "(15th/50th/85th percentiles) stays stable instead of drifting.",
            "Ioffe & Szegedy 2015, fig. 1, https://arxiv.org/abs/1502.03167", runs=lambda preset: 2, order=30)
def run(ctx: Context):
    steps = ctx.pick(150, 400, 1000)
    plain, bn = _train_one(ctx, False, steps), _train_one(ctx, True, steps)
    m = {"steps": steps}
    for key, (run_dir, q, _) in (("plain", plain), ("batchnorm", bn)):
        m[f"{key}_final_loss"] = tail_mean(losses(run_dir)[1])
        m[f"{key}_percentile_drift"] = float(np.abs(q[-10:].mean(0) - q[:10].mean(0)).max())
        m[f"{key}_percentiles_first"], m[f"{key}_percentiles_last"] = q[0].tolist(), q[-1].tolist()
    ok = (m["batchnorm_final_loss"] < 0.8 * m["plain_final_loss"]
          and m["batchnorm_percentile_drift"] < m["plain_percentile_drift"])
    measured = (f"final training loss {m['plain_final_loss']:.3f} without BatchNorm, {m['batchnorm_final_loss']:.3f} "
                f"with; largest drift of a percentile of the last sigmoid's input from the first to the last 10 steps: "
                f"{m['plain_percentile_drift']:.2f} without, {m['batchnorm_percentile_drift']:.2f} with.")
    return result(NAME, measured, ok, m, _figures(plain, bn), [plain[0], bn[0]], ctx,
                  notes=f"digits instead of MNIST, 3 hidden layers of 100 sigmoids, SGD lr 0.5, batch 60, "
                        f"{steps} steps.",
                  rule=("BatchNorm's final loss < 0.8 x the plain net's, and its largest percentile drift is smaller "
                        "than the plain net's."))


def _figures(plain: tuple, bn: tuple) -> list[Figure]:
    fig, axes = P.figure(3, width=3.6)
    P.loss_curve(axes[0], {"plain": losses(plain[0]), "BatchNorm": losses(bn[0])}, "training loss",
                 ylabel="cross-entropy (nats)", log=True)
    for ax, (label, (_, q, _o)) in zip(axes[1:], (("without BatchNorm", plain), ("with BatchNorm", bn))):
        for j, p in enumerate(QUANTILES):
            P.line(ax, np.arange(len(q)), q[:, j], label=f"{int(p * 100)}th pct", color=f"C{j}")
        ax.set(xlabel="training step", ylabel="input to last sigmoid", title=f"percentiles, {label}")
        ax.legend()
    figs = [Figure("Training speed and the input distribution of the last sigmoid", P.to_uri(fig))]
    fig, axes = P.figure(2)
    bins = np.linspace(0, 1, 41)
    for ax, (label, (_, _q, outs)) in zip(axes, (("without BatchNorm", plain), ("with BatchNorm", bn))):
        P.histogram(ax, {f"layer {i + 1}": v for i, v in sorted(outs.items())}, bins,
                    f"sigmoid outputs at the last step, {label}", "sigmoid output (0 and 1: saturated)")
    figs.append(Figure("Activation saturation histograms", P.to_uri(fig),
                       "Mass near 0 or 1 is saturation, where the sigmoid's derivative (at most 0.25) is tiny."))
    return figs
