"""Per-run views: the plots `graddoctor report RUN_DIR` draws for any recorded run.

- gradient flow: layer x step heat map of gradient norms, log colour scale;
- per-layer gradient-norm profiles at chosen steps (first, middle, last);
- loss (and global gradient norm) with loss spikes and recorded interventions marked;
- activation saturation: fraction saturated (bounded activations) or exactly zero (ReLU family)
  per activation module at the first and last sampled step.
Each view returns a `Figure`; a run without the data for a view gets no figure for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..core._amp import overflowed
from ..store._run import Run, open_run
from ..treat._interventions import acted
from . import _plots as P
from ._figure import Figure


def _layer_grads(run: Run) -> tuple[list[str], np.ndarray, np.ndarray]:
    names = run.layers
    hs = [run.layer_history(n) for n in names]
    steps = hs[0].steps if hs else np.zeros(0, dtype=np.int64)
    grads = np.stack([h.grad_norm for h in hs], axis=1) if hs else np.zeros((0, 0))
    return names, steps, grads


def heatmap_figure(run_dir: Path | str, title: str = "gradient flow") -> Figure:
    """Layer x step heat map of per-layer gradient norms of one run."""
    with open_run(run_dir) as run:
        names, steps, grads = _layer_grads(run)
    fig, axes = P.figure(1, width=6.0, height=min(5.0, max(2.4, 0.16 * len(names) + 1.2)))
    P.heatmap(axes[0], steps, names, grads, title)
    return Figure(title, P.to_uri(fig))


def chosen_steps(steps: np.ndarray, k: int = 3) -> list[int]:
    """k recorded steps spread from the first to the last (indices into `steps`)."""
    if len(steps) == 0:
        return []
    return sorted(set(np.linspace(0, len(steps) - 1, k).round().astype(int).tolist()))


def profile_figure(run_dir: Path | str, title: str = "per-layer gradient norm") -> Figure:
    """Per-layer gradient-norm profiles at the first, middle and last recorded step."""
    with open_run(run_dir) as run:
        names, steps, grads = _layer_grads(run)
    fig, axes = P.figure(1, width=5.5)
    P.profiles(axes[0], names, {f"step {int(steps[i])}": grads[i] for i in chosen_steps(steps)}, title)
    if len(names) <= 16:
        axes[0].set_xticks(range(len(names)))
        axes[0].set_xticklabels([P._short(n, 10) for n in names], rotation=45, ha="right")
    return Figure(title, P.to_uri(fig))


def loss_spikes(loss: np.ndarray) -> np.ndarray:
    """Indices of the losses diagnose calls spikes (its detector and default thresholds), so the page
    never marks a spike that `graddoctor diagnose` does not report."""
    from ..diagnosis._config import DiagnoseConfig
    from ..diagnosis._rules_loss import spike_mask
    return np.flatnonzero(spike_mask(loss, DiagnoseConfig())[0])


def loss_figure(run_dir: Path | str, title: str = "loss and global gradient norm") -> Figure:
    """Loss and global gradient norm over steps; spikes (orange), interventions (purple) and NaN/Inf (red) marked."""
    with open_run(run_dir) as run:
        steps, loss = run.loss()
        gsteps, gnorm = run.global_norm()
        events = [e for e in run.events() if acted(e)]
        amp_steps, amp = run.amp()
    fig, axes = P.figure(2)
    spikes = steps[loss_spikes(loss)].tolist()
    interventions = sorted({e["step"] for e in events})
    positive = loss[np.isfinite(loss)]
    P.loss_curve(axes[0], {"loss": (steps, loss)}, "training loss", log=bool(len(positive) and positive.min() > 0),
                 spikes={"loss": spikes}, events={"loss": interventions})
    P.line(axes[1], gsteps, gnorm, log=True, color="C1")
    axes[1].set(xlabel="training step", ylabel="global gradient L2 norm (log)", title="global gradient norm")
    kinds = ", ".join(sorted({e["kind"] for e in events})) or "none"
    caption = (f"{len(spikes)} loss spike(s) marked in orange; {len(interventions)} step(s) where a recorded "
               f"intervention acted ({kinds}) as purple triangles at the bottom; grey x: a value of 0 that a log "
               f"axis cannot show.")
    if len(amp_steps):  # mixed precision: the GradScaler's loss scale, and the steps it skipped
        P.amp_scale(axes[1], amp_steps, amp[:, 0])
        skipped = int(overflowed(amp).sum())
        caption += (f" Dashed grey, right axis: the AMP loss scale; {skipped} step(s) the GradScaler skipped for an "
                    f"overflow (their gradient norm is NaN/Inf, red at the top; diagnose leaves them out).")
    return Figure(title, P.to_uri(fig), caption)


def activation_figure(run_dir: Path | str, title: str = "activation saturation") -> Optional[Figure]:
    """Fraction of saturated (bounded) or zero (ReLU family) outputs per activation module, first vs last sample."""
    with open_run(run_dir) as run:
        steps, acts = run.activations()
        mods = run.activation_modules
        relu = [run.activation_relu_family.get(m, False) for m in mods]
    if len(steps) == 0 or not mods:
        return None
    col = np.array([3 if r else 2 for r in relu])  # frac_zero for the ReLU family, frac_saturated otherwise
    first = acts[0, np.arange(len(mods)), col]
    last = acts[-1, np.arange(len(mods)), col]
    fig, axes = P.figure(1, width=5.5)
    P.bars(axes[0], [P._short(m, 10) for m in mods], {f"step {int(steps[0])}": first, f"step {int(steps[-1])}": last},
           title, "fraction of outputs")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_xlabel("activation module (ReLU family: fraction exactly 0; bounded: fraction within 1% of a bound)")
    return Figure(title, P.to_uri(fig))


def run_figures(run_dir: Path | str) -> list[Figure]:
    """Every per-run view that the run has data for (none for a run that recorded no step)."""
    with open_run(run_dir) as run:
        if run.num_steps == 0:
            return []
    figs = [heatmap_figure(run_dir), profile_figure(run_dir), loss_figure(run_dir)]
    act = activation_figure(run_dir)
    return figs + ([act] if act is not None else [])
