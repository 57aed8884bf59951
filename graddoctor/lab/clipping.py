"""Clipping compared: by value, by norm, AutoClip, AGC and ZClip (graddoctor.treat transforms).

Two set-ups, every method run through `watch(..., guard=...)` so each
intervention is recorded as an event:
- exploding: the ReLU RNN with recurrent gain 1.7 (SGD, lr 0.05) on the adding problem (plain SGD turns NaN);
- spiky: an MLP on digits where every 40th batch is an outlier (inputs x 30). The bad batch's
  huge gradient throws the weights off, and the loss stays high for many steps after it; a
  clip keeps that one update small. We measure the mean loss over the 10 steps after each spike
  minus the mean over the 10 steps before it. An outlier batch spikes only while the net gets some
  of it wrong: once it classifies the whole batch right, x 30 makes it certain and the gradient
  vanishes instead (late in the quick preset, for most seeds).
"""
from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from ..report import _plots as P
from ..report._views import loss_figure
from ..store._run import open_run
from ..treat._interventions import intervention_steps
from ._train import digits, losses, mlp, seed_all, tail_mean, train
from ._types import Context, Figure, experiment, result
from .recurrent import EXPLODING_GAIN, EXPLODING_LR, SeqNet, adding_batch

NAME = "clipping"
SPIKE_EVERY, SPIKE_SCALE = 40, 30.0


def _methods() -> dict:
    from .. import treat
    return {"none": None, "clip_value(0.5)": treat.clip_value(0.5), "clip_norm(1.0)": treat.clip_norm(1.0),
            "auto_clip(10)": treat.auto_clip(10.0), "agc(0.05)": treat.agc(0.05), "zclip()": treat.zclip()}


def _exploding_run(ctx: Context, label: str, guard, steps: int):
    gen = seed_all(ctx.seed)
    model = SeqNet("rnn", 2, 1, nonlinearity="relu")
    w_hh = cast(Tensor, model.rnn.weight_hh_l0)
    with torch.no_grad():
        nn.init.orthogonal_(w_hh)
        w_hh *= EXPLODING_GAIN
    run_dir = ctx.run_dir(NAME, "exploding_" + _slug(label))
    train(model, run_dir, steps, lambda s: adding_batch(64, 30, gen), nn.functional.mse_loss,
          torch.optim.SGD(model.parameters(), lr=EXPLODING_LR), guard=guard)
    ctx.tick(f"{NAME}/exploding/{label}")
    return run_dir


def _spiky_run(ctx: Context, label: str, guard, steps: int):
    x, y = digits()
    gen = seed_all(ctx.seed)
    model = mlp([64, 64, 64, 10], "relu", "he")

    def batch(step: int):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        xb = x[idx] * SPIKE_SCALE if step % SPIKE_EVERY == SPIKE_EVERY - 1 else x[idx]
        return xb, y[idx]
    run_dir = ctx.run_dir(NAME, "spiky_" + _slug(label))
    train(model, run_dir, steps, batch, nn.functional.cross_entropy,
          torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), guard=guard, stop_on_nonfinite=False)
    ctx.tick(f"{NAME}/spiky/{label}")
    return run_dir


def spike_damage(loss: np.ndarray, every: int = SPIKE_EVERY, window: int = 10) -> float:
    """Mean over outlier steps s of mean(loss[s+1 : s+1+window]) - mean(loss[s-window : s])."""
    out = []
    for s in range(every - 1, len(loss) - window - 1, every):
        out.append(np.mean(loss[s + 1:s + 1 + window]) - np.mean(loss[s - window:s]))
    return float(np.mean(out)) if out else math.nan


def _runs(preset: str) -> int:
    return 12


@experiment(NAME, "Gradient clipping compared",
            "Clipping by value ([-0.5, 0.5]) or by L2 norm (scale = clip_norm / ||g||) stops an exploding gradient "
            "from blowing up the weights; adaptive clips (AutoClip's percentile, AGC's unit-wise ratio, ZClip's "
            "z-score) contain loss spikes without a hand-tuned threshold, ZClip leaving ordinary steps alone.",
            "seeds 001/003/004; Pascanu et al. 2013; AutoClip (Seetharaman et al. 2020); AGC (Brock et al. 2021); "
            "ZClip (Kumar et al. 2025)", runs=_runs, order=60)
def run(ctx: Context):
    steps_e, steps_s = ctx.pick(60, 100, 200), ctx.pick(200, 400, 800)
    exploding, spiky = {}, {}
    for label, guard in _methods().items():
        exploding[label] = _exploding_run(ctx, label, guard, steps_e)
    for label, guard in _methods().items():
        spiky[label] = _spiky_run(ctx, label, guard, steps_s)
    m: dict[str, dict] = {"exploding_finite": {}, "exploding_final_loss": {}, "spiky_damage": {},
                          "spiky_final_loss": {}, "interventions": {}}
    for label, r in exploding.items():
        loss = losses(r)[1]
        m["exploding_finite"][label] = bool(np.isfinite(loss).all())
        m["exploding_final_loss"][label] = tail_mean(loss)
    for label, r in spiky.items():
        loss = losses(r)[1]
        m["spiky_damage"][label] = spike_damage(loss)
        m["spiky_final_loss"][label] = tail_mean(loss)
        with open_run(r) as run:
            m["interventions"][label] = len(intervention_steps(run)) / max(1, run.num_steps)
    clipped = [k for k in m["exploding_finite"] if k != "none"]
    failed = [k for k in clipped if not m["exploding_finite"][k]]
    dmg = m["spiky_damage"]
    n_less = sum(dmg[k] < 0.5 * dmg["none"] for k in clipped)
    ok = (not m["exploding_finite"]["none"] and m["exploding_finite"]["clip_value(0.5)"]
          and m["exploding_finite"]["clip_norm(1.0)"] and dmg["none"] > 0.1 and n_less >= 3)
    measured = (f"exploding RNN: unclipped {'finite' if m['exploding_finite']['none'] else 'NaN/Inf'}; finite with "
                f"{len(clipped) - len(failed)}/{len(clipped)} clipping methods"
                f"{' (not with ' + ', '.join(failed) + ')' if failed else ''}. Spiky run, loss increase after an "
                f"outlier batch: " + ", ".join(f"{k} {v:.2f}" for k, v in dmg.items()) +
                "; fraction of steps clipped: " + ", ".join(f"{k} {v:.0%}" for k, v in m["interventions"].items()
                                                           if k != "none") + ".")
    runs = list(exploding.values()) + list(spiky.values())
    return result(NAME, measured, ok, m, _figures(exploding, spiky), runs, ctx,
                  notes=f"Spiky set-up: MLP 64-64-64-10 (ReLU, He) on digits, SGD lr 0.05 momentum 0.9; every "
                        f"{SPIKE_EVERY}th batch has its inputs multiplied by {SPIKE_SCALE:g}. AGC's lambda is 0.05 "
                        "(the paper's 0.01 is for batch 4096). The RNN explodes within its first few steps: ZClip does "
                        "not clip during its 25-step warm-up, and AutoClip's percentile of a history of one or two "
                        "norms is the exploding norm itself, so adaptive clips can miss it (depending on the seed).",
                  rule=("the unclipped RNN has a NaN/Inf loss; with value and with norm clipping (the seeds' cures) "
                        "it stays finite; the unclipped spiky run's post-spike damage is > 0.1 and at least 3 methods "
                        "halve it."))


def _figures(exploding: dict, spiky: dict) -> list[Figure]:
    fig, axes = P.figure(2)
    P.loss_curve(axes[0], {k: losses(r) for k, r in exploding.items()}, "exploding ReLU RNN (adding problem)",
                 ylabel="MSE", log=True)
    P.loss_curve(axes[1], {k: losses(r) for k, r in spiky.items()},
                 f"MLP with an outlier batch every {SPIKE_EVERY} steps", ylabel="cross-entropy (nats)", log=True)
    for s in range(SPIKE_EVERY - 1, 10 ** 5, SPIKE_EVERY):
        if s > axes[1].get_xlim()[1]:
            break
        axes[1].axvline(s, color="grey", linewidth=0.5, linestyle=":")
    return [Figure("Loss with each clipping method", P.to_uri(fig),
                   "Red triangles: NaN/Inf. Dotted lines (right): outlier batches."),
            loss_figure(spiky["zclip()"], "spiky run with ZClip: loss spikes (orange) and clipping events (purple)"),
            loss_figure(spiky["none"], "spiky run without clipping")]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")
