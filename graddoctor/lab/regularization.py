"""L1 and L2 weight regularization: weight-norm growth and gradients with and without a penalty.

An MLP fits a small subset of digits (200 images) for many steps with a large
learning rate, which lets the weights grow as the net memorizes. Adding
graddoctor.treat's l2_penalty (lambda / 2 * sum w^2) or l1_penalty (lambda * sum |w|) to the loss pulls the weights
back: the recorded weight norm grows less, gradients stay smaller, and L1
drives many weights to (near) zero.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..report import _plots as P
from ..store._run import open_run
from ._train import digits, losses, mlp, sampler, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result

NAME = "regularization"
PENALTIES = {"none": 0.0, "L2 (2e-2)": 2e-2, "L1 (1e-3)": 1e-3}


def penalty(model: nn.Module, kind: str, coef: float) -> Tensor:
    """graddoctor.treat's penalty: L2 is coef / 2 * sum w^2, L1 is coef * sum |w| (weights only, no biases)."""
    from ..treat import l1_penalty, l2_penalty
    return (l2_penalty if kind.startswith("L2") else l1_penalty)(model, coef)


def _weights(run_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample steps, total weight L2 norm, global gradient norm per step) as recorded by watch."""
    with open_run(run_dir) as run:
        steps, w = run.series("weight_norm")
        assert w is not None, f"{run_dir} has no weight norms (train() records them)"
        _, g = run.global_norm()
        return steps, np.sqrt(np.square(w.astype(np.float64)).sum(axis=1)), g


@experiment(NAME, "L1 / L2 weight regularization",
            "Penalizing the weights (L2: lambda / 2 * sum w^2, L1: lambda * sum |w|) keeps them from growing large "
            "(large weights are what makes the backprop product explode, seed 000); L1 also makes weights sparse. "
            "The penalty adds its own gradient, so the global gradient norm does not go to zero.",
            "seeds 001/003/004", runs=lambda preset: len(PENALTIES), order=70)
def run(ctx: Context):
    steps = ctx.pick(300, 600, 1500)
    x, y = digits()
    g0 = torch.Generator().manual_seed(ctx.seed)
    idx = torch.randperm(len(x), generator=g0)[:200]
    x, y = x[idx], y[idx]
    runs, zero_frac = {}, {}
    for label, lam in PENALTIES.items():
        gen = seed_all(ctx.seed)
        model = mlp([64, 128, 128, 10], "relu", "default")
        run_dir = ctx.run_dir(NAME, label.split()[0].lower())

        def loss_fn(out, t, model=model, label=label, lam=lam):
            ce = nn.functional.cross_entropy(out, t)
            return ce + penalty(model, label, lam) if lam else ce
        train(model, run_dir, steps, sampler(x, y, 32, gen), loss_fn, torch.optim.SGD(model.parameters(), lr=0.3))
        w = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("weight")])
        zero_frac[label] = float((w.abs() < 1e-3).float().mean())
        runs[label] = run_dir
        ctx.tick(f"{NAME}/{label}")
    m = {"final_weight_norm": {}, "weight_norm_growth": {}, "late_grad_norm": {},
         "near_zero_weight_fraction": zero_frac, "final_loss": {k: tail_mean(losses(r)[1]) for k, r in runs.items()}}
    for k, r in runs.items():
        _, wn, g = _weights(r)
        m["final_weight_norm"][k], m["weight_norm_growth"][k] = float(wn[-1]), float(wn[-1] / wn[0])
        m["late_grad_norm"][k] = tail_mean(g, 0.2)
    growth = m["weight_norm_growth"]
    ok = (growth["none"] > 1.0 and growth["L2 (2e-2)"] < 1.0 and growth["L1 (1e-3)"] < 1.0
          and zero_frac["L1 (1e-3)"] > 5 * zero_frac["none"])
    measured = ("weight-norm growth over training: " + ", ".join(f"{k} x{v:.2f}" for k, v in growth.items()) +
                "; weights below 1e-3: " + ", ".join(f"{k} {v:.1%}" for k, v in zero_frac.items()) +
                "; late global gradient norm: " +
                ", ".join(f"{k} {v:.3g}" for k, v in m["late_grad_norm"].items()) + ".")
    return result(NAME, measured, ok, m, _figures(runs), list(runs.values()), ctx,
                  notes=f"MLP 64-128-128-10 (ReLU, PyTorch default init) on 200 digits, SGD lr 0.3, batch 32, "
                        f"{steps} steps; the penalty (gd.treat.l1_penalty / l2_penalty) is added to the loss that "
                        "watch records.",
                  rule=('the unpenalized weight norm grows (x > 1), the L1 and L2 runs end below their start (x < 1), '
                        'and L1 leaves > 5x as many near-zero weights as no penalty.'))


def _figures(runs: dict) -> list[Figure]:
    fig, axes = P.figure(3, width=3.6)
    for k, r in runs.items():
        s, wn, g = _weights(r)
        P.line(axes[0], s, wn, label=k)
        P.line(axes[1], np.arange(len(g)), g, label=k, log=True, linewidth=0.8)
    axes[0].set(xlabel="training step", ylabel="total weight L2 norm", title="weight norm (recorded by watch)")
    axes[1].set(xlabel="training step", ylabel="global gradient L2 norm (log)", title="gradient norm")
    axes[0].legend()
    axes[1].legend()
    P.loss_curve(axes[2], {k: losses(r) for k, r in runs.items()}, "loss (with penalty)", log=True,
                 ylabel="loss (nats)")
    return [Figure("Weight growth, gradient norm and loss with and without a penalty", P.to_uri(fig))]
