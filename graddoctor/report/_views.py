"""Per-run views: the plots `graddoctor report RUN_DIR` draws for any recorded run.

- gradient flow: row x step heat map of gradient norms, log colour scale, one row per block of a
  large model and per layer of a small one (`_rows`), every row labelled;
- gradient-norm profiles over the same rows at chosen steps (first, middle, last);
- loss (and global gradient norm) with loss spikes and recorded interventions marked;
- activation saturation: fraction saturated (bounded activations) or exactly zero (ReLU family)
  per activation module at the first and last sampled step, each named with its block.
Each view returns a `Figure`; a run without the data for a view gets no figure for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..core._amp import overflowed
from ..store._run import open_run
from ..treat._interventions import acted
from . import _plots as P
from ._figure import Figure
from ._rows import ActRows, GradRows, act_rows, grad_rows


def heatmap_plot(rows: GradRows, title: str = "gradient flow"):
    """The heat map of `rows` as a matplotlib figure: one labelled row each, its height from their number."""
    fig, axes = P.figure(1, width=6.0, height=max(2.4, P.ROW_INCHES * len(rows.names) + 1.3))
    P.heatmap(axes[0], rows.steps, rows.labels, rows.values, title,
              ylabel="block (input at top)" if rows.by_block else "layer: module name (input at top)")
    return fig


def heatmap_figure(run_dir: Path | str, title: str = "gradient flow") -> Figure:
    """Row x step heat map of the gradient norms of one run, per block or per layer (see `_rows`)."""
    with open_run(run_dir) as run:
        rows = grad_rows(run)
    return Figure(title, P.to_uri(heatmap_plot(rows, title)), rows_caption(rows))


def rows_caption(rows: GradRows) -> str:
    """What the rows are; for blocks, their names in order (the labels on the plot are shortened)."""
    if not rows.by_block:
        return ""
    n = sum(len(t) for t in rows.tensors)
    return (f"One row per block: {len(rows.names)} blocks of {n} tensors; a block's gradient norm is the L2 norm "
            f"of all its tensors' gradients. Rows, input side first: {', '.join(rows.names)}.")


def chosen_steps(steps: np.ndarray, k: int = 3) -> list[int]:
    """k recorded steps spread from the first to the last (indices into `steps`)."""
    if len(steps) == 0:
        return []
    return sorted(set(np.linspace(0, len(steps) - 1, k).round().astype(int).tolist()))


def profile_plot(rows: GradRows, title: str = "per-layer gradient norm"):
    """Gradient-norm profiles over the rows at the first, middle and last recorded step, every row named."""
    fig, axes = P.figure(1, width=max(5.5, P.ROW_INCHES * len(rows.names) + 2.5), height=3.4)
    P.profiles(axes[0], rows.labels, {f"step {int(rows.steps[i])}": rows.values[i] for i in chosen_steps(rows.steps)},
               title, named=True)
    axes[0].set_xlabel("block (input side first)" if rows.by_block else "layer (input side first)")
    return fig


def profile_figure(run_dir: Path | str, title: Optional[str] = None) -> Figure:
    """Per-block (or per-layer) gradient-norm profiles at the first, middle and last recorded step."""
    with open_run(run_dir) as run:
        rows = grad_rows(run)
    title = title or f"per-{'block' if rows.by_block else 'layer'} gradient norm"
    return Figure(title, P.to_uri(profile_plot(rows, title)), rows_caption(rows))


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


def activation_plot(acts: ActRows, title: str = "activation saturation"):
    """The activation panel of `acts`: one pair of bars per module, each named with its block."""
    fig, axes = P.figure(1, width=max(5.5, P.ROW_INCHES * len(acts.names) + 2.5), height=3.4)
    first, last = acts.steps
    P.bars(axes[0], acts.labels, {f"step {first}": acts.values[0], f"step {last}": acts.values[1]},
           title, "fraction of outputs")
    axes[0].set_ylim(0, 1.05)
    axes[0].set_xlabel("activation module (ReLU family: fraction exactly 0; bounded: fraction within 1% of a bound)")
    return fig


def activation_figure(run_dir: Path | str, title: str = "activation saturation") -> Optional[Figure]:
    """Fraction of saturated (bounded) or zero (ReLU family) outputs per activation module, first vs last sample."""
    with open_run(run_dir) as run:
        acts = act_rows(run)
    if acts is None:
        return None
    caption = (f"One pair of bars per block of activation modules ({len(acts.names)} blocks): the largest fraction "
               "among its modules." if acts.grouped else "")
    return Figure(title, P.to_uri(activation_plot(acts, title)), caption)


def run_figures(run_dir: Path | str) -> list[Figure]:
    """Every per-run view that the run has data for (none for a run that recorded no step)."""
    with open_run(run_dir) as run:
        if run.num_steps == 0:
            return []
    figs = [heatmap_figure(run_dir), profile_figure(run_dir), loss_figure(run_dir)]
    act = activation_figure(run_dir)
    return figs + ([act] if act is not None else [])
