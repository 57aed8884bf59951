"""The prescription in HTML: the verdict, the trial table, the loss curves side by side (one panel per trial,
the baseline dashed in each) and a gradient-flow heat map per trial. Used by `graddoctor report OUT` (when OUT
holds a prescription.json) and by the lab's `doctor` experiment."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..report import _html as H
from ..report import _plots as P
from ..report._figure import Figure
from ..report._views import heatmap_figure
from ._prescription import Prescription, format_prescription, load_prescription

PER_ROW = 4


def loss_figure(rx: Prescription, title: str = "loss curves, one panel per trial") -> Figure:
    """Each trial's training loss in its own panel, best first, with the baseline dashed in every panel."""
    trials = rx.trials
    rows = max(1, math.ceil(len(trials) / PER_ROW))
    fig, axes = P.figure(min(PER_ROW, len(trials)), width=3.2, height=2.4 * rows)
    fig.clear()
    grid = fig.subplots(rows, min(PER_ROW, len(trials)), squeeze=False)
    base = np.asarray(rx.baseline.losses, dtype=np.float64)
    finite = np.concatenate([np.asarray(t.losses, dtype=np.float64) for t in trials] or [np.zeros(1)])
    finite = finite[np.isfinite(finite)]
    top = float(np.percentile(finite, 99)) * 1.1 if finite.size else 1.0
    for k, ax in enumerate(grid.ravel()):
        if k >= len(trials):
            ax.set_visible(False)
            continue
        t = trials[k]
        y = np.asarray(t.losses, dtype=np.float64)
        if t.remedy != "baseline":
            P.line(ax, np.arange(len(base)), base, color="grey", linestyle="--", linewidth=0.8)
        P.line(ax, np.arange(len(y)), y, color="C0" if k else "C2", linewidth=1)
        P.mark_nonfinite(ax, np.arange(len(y)), y)
        ax.set_ylim(0, top)
        ax.set_title(f"{k + 1}. {t.remedy}"[:34], fontsize=8)
    return Figure(title, P.to_uri(fig), "Best first; dashed grey: the baseline; red: NaN/Inf. One y scale for all.")


def figures(rx: Prescription, heatmaps: bool = True) -> list[Figure]:
    """The loss panels, then a gradient-flow heat map per trial that trained (best first)."""
    figs = [loss_figure(rx)]
    if heatmaps:
        figs += [heatmap_figure(t.run_dir, f"gradient flow: {t.remedy}") for t in rx.trials
                 if t.losses and Path(t.run_dir).exists()]
    return figs


def section(rx: Prescription, heatmaps: bool = True) -> str:
    """The prescription as one HTML section."""
    return (f"<section id=\"prescription\"><h2>Prescription</h2><pre>{H.esc(format_prescription(rx))}</pre>"
            f"{H.figures(figures(rx, heatmaps))}</section>")


def prescription_page(out: str | Path, title: str | None = None) -> str:
    """The page `graddoctor report OUT` writes for a doctor's output directory."""
    rx = load_prescription(out)
    return H.page(title or "graddoctor doctor", f"<h1>{H.esc(title or 'graddoctor doctor')}</h1>" + section(rx))
