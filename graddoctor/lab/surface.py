"""Seed 004, figure 1: gradient descent on a 2-D loss surface with too small and too large a step.

The "model" is one point p = (x, y) on the bowl L(p) = (a x^2 + b y^2) / 2,
trained with plain SGD and recorded with `watch`. Along y the update is
y <- (1 - lr b) y: a tiny step barely moves (the run stalls far from the
optimum, seed 004's point B), while lr b = 2 flips the sign of y every step
(the run jumps from A across the valley to F and back again, forever).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core._compose import watch
from ..report import _plots as P
from ._train import losses
from ._types import Context, Figure, experiment, result

NAME = "surface"
A, B = 1.0, 4.0           # curvatures along x and y
START = (-4.0, 2.5)       # seed 004's point A
RATES = {"too small (lr=0.01)": 0.01, "good (lr=0.3)": 0.3, "too large (lr=0.5)": 0.5}


class Point(nn.Module):
    """A 2-D point as the only parameter; forward returns the loss of the bowl at that point."""

    def __init__(self, start: tuple[float, float]):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(start, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return 0.5 * (A * self.p[0] ** 2 + B * self.p[1] ** 2)


def descend(lr: float, steps: int, run_dir) -> np.ndarray:
    """SGD from START; returns the trajectory [steps + 1, 2]."""
    model = Point(START)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    path = [model.p.detach().numpy().copy()]
    with watch(model, opt, run_dir, overwrite=True, input_stats=False, live_diagnosis=False) as w:
        for _ in range(steps):
            loss = model()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
            path.append(model.p.detach().numpy().copy())
    return np.array(path)


@experiment(NAME, "Seed 004: step size on a 2-D loss surface",
            "Too small a step stalls far from the optimum (point B); too large a step overshoots to the other "
            "side of the valley (point F) and back to A, never settling.",
            "seed 004, figure 1", runs=lambda preset: len(RATES), order=90)
def run(ctx: Context):
    steps = ctx.pick(30, 40, 60)
    paths, runs = {}, []
    for label, lr in RATES.items():
        run_dir = ctx.run_dir(NAME, f"lr_{lr:g}")
        paths[label] = descend(lr, steps, run_dir)
        runs.append(run_dir)
        ctx.tick(f"{NAME}/{label}")
    d0 = float(np.hypot(*START))
    dist = {k: float(np.hypot(*p[-1])) / d0 for k, p in paths.items()}
    big = paths["too large (lr=0.5)"][:, 1]
    flips = float(np.mean(np.sign(big[1:]) != np.sign(big[:-1])))
    y_kept = float(abs(big[-1]) / abs(START[1]))
    m = {"final_distance_over_start": dist, "too_large_y_sign_flip_fraction": flips,
         "too_large_final_abs_y_over_start": y_kept}
    ok = (dist["too small (lr=0.01)"] > 0.25 and dist["good (lr=0.3)"] < 0.01 and flips == 1.0
          and y_kept > 0.9)
    measured = (f"after {steps} steps the distance to the optimum is {dist['too small (lr=0.01)']:.2f} of the start "
                f"with lr 0.01, {dist['good (lr=0.3)']:.1e} with lr 0.3; with lr 0.5 y changes sign on "
                f"{flips:.0%} of steps and keeps {m['too_large_final_abs_y_over_start']:.0%} of its size.")
    return result(NAME, measured, ok, m, _figures(paths, runs), runs, ctx,
                  rule=('lr 0.01 ends > 0.25 of the start distance from the optimum, lr 0.3 < 0.01, and lr 0.5 '
                        'flips the sign of y on every step while keeping > 90% of |y|.'))


def _figures(paths: dict, runs: list) -> list[Figure]:
    fig, axes = P.figure(2, width=4.8, height=3.6)
    ax = axes[0]
    xs, ys = np.meshgrid(np.linspace(-4.5, 4.5, 121), np.linspace(-3.2, 3.2, 121))
    cs = ax.contour(xs, ys, 0.5 * (A * xs ** 2 + B * ys ** 2), levels=12, cmap="Greys", linewidths=0.6)
    ax.clabel(cs, fontsize=6)
    for i, (label, p) in enumerate(paths.items()):
        ax.plot(p[:, 0], p[:, 1], "-o", markersize=2.5, linewidth=0.9, label=label, color=f"C{i}")
    ax.annotate("A (start)", START, textcoords="offset points", xytext=(4, 6))
    ax.plot([0], [0], "k*", markersize=9, label="optimum")
    ax.set(xlabel="parameter x", ylabel="parameter y", title="trajectories on L = (x^2 + 4 y^2) / 2")
    ax.set_aspect("equal")
    ax.legend(loc="lower right")
    curves = {label: losses(r) for label, r in zip(paths, runs)}
    P.loss_curve(axes[1], curves, "loss recorded by watch", log=True, ylabel="loss")
    return [Figure("Gradient descent with three step sizes", P.to_uri(fig),
                   "Blue barely moves (stalls); orange converges; green bounces across the valley every step.")]
