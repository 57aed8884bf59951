"""Plot primitives for the HTML report: matplotlib figures as inline PNG data URIs.

The figures are made by `_style` (matplotlib's object API: no pyplot, no global rcParams), so
drawing a report leaves the caller's matplotlib as it was.

Every primitive survives NaN and Inf, the very values this tool is about:
non-finite points are left out of lines and drawn as red markers at the edge
of the axes, so a diverged run shows where it diverged instead of crashing
the plot. Log scales use only positive finite values.
"""
from __future__ import annotations

import base64
from typing import Optional, Sequence

import numpy as np

NONFINITE_COLOR = "#d62728"
# Inches per labelled row (or column) of a heat map, profile or bar chart: an 8 pt label is 0.11 in high,
# so every row keeps its label, with a little air, whatever the row count.
ROW_INCHES = 0.16


def _style():
    """The `_style` module, imported on first use (matplotlib is optional), with an install hint."""
    try:
        from . import _style as style
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the report needs matplotlib: pip install 'graddoctor[lab]'") from e
    return style


def figure(ncols: int = 1, width: float = 4.6, height: float = 3.0):
    """A new figure with `ncols` axes side by side; returns (fig, list of axes)."""
    return _style().new_figure(ncols, width, height)


def to_uri(fig) -> str:
    """Render a figure; return a `data:image/png;base64,...` URI."""
    return "data:image/png;base64," + base64.b64encode(_style().png(fig)).decode("ascii")


def as_float(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def mark_nonfinite(ax, x: np.ndarray, y: np.ndarray, label: Optional[str] = "NaN/Inf") -> int:
    """Draw a red marker at the top of `ax` at each x where y is NaN/Inf; return how many."""
    bad = ~np.isfinite(y)
    if bad.any():
        ax.plot(x[bad], np.ones(bad.sum()), linestyle="none", marker="v", color=NONFINITE_COLOR,
                transform=ax.get_xaxis_transform(), clip_on=False, label=label, markersize=5)
    return int(bad.sum())


def line(ax, x, y, label: Optional[str] = None, log: bool = False, **kw) -> None:
    """A line of finite points (positive ones on a log axis); non-finite points marked, not drawn."""
    x, y = as_float(x), as_float(y)
    ok = np.isfinite(y) & ((y > 0) if log else True)
    if ok.sum() <= 3 and "marker" not in kw:  # a line of one point is invisible
        kw["marker"] = "o"
    ax.plot(x[ok], y[ok], label=label, **kw)
    mark_nonfinite(ax, x, y, label=None)
    if log:
        zero = np.isfinite(y) & (y <= 0)
        if zero.any():  # a log axis cannot show 0 (e.g. a gradient that underflowed): grey x at the bottom edge
            ax.plot(x[zero], np.zeros(zero.sum()), linestyle="none", marker="x", color="grey", markersize=4,
                    transform=ax.get_xaxis_transform(), clip_on=False)
        if ok.any():
            ax.set_yscale("log")


def amp_scale(ax, steps: np.ndarray, scale: np.ndarray) -> None:
    """A GradScaler's loss scale over steps, dashed on a log2 right-hand axis of `ax`."""
    right = ax.twinx()
    right.plot(as_float(steps), as_float(scale), color="grey", linestyle="--", linewidth=1)
    right.set_yscale("log", base=2)
    right.set_ylabel("AMP loss scale (log2)", color="grey")
    _style().style_plain(right, grid=True)


def heatmap(ax, steps: np.ndarray, labels: Sequence[str], values: np.ndarray, title: str,
            cbar_label: str = "gradient L2 norm (log scale)",
            ylabel: str = "layer: module name (input at top)") -> None:
    """Row x step heat map on a log colour scale; NaN/Inf cells drawn in red, zero/missing in grey.

    Args:
      labels: one per row, every one printed (size the figure with `ROW_INCHES` per row).
      values: [T, L] (steps x rows).
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap, LogNorm
    v = np.asarray(values, dtype=np.float64).T  # rows on the y axis, input side at the top
    pos = v[np.isfinite(v) & (v > 0)]
    lo, hi = (pos.min(), pos.max()) if pos.size else (1e-8, 1.0)
    if hi <= lo:
        hi = lo * 10
    cmap = colormaps["viridis"].with_extremes(bad="#bbbbbb")
    masked = np.ma.masked_where(~(np.isfinite(v) & (v > 0)), v)
    extent = (float(steps[0]) - 0.5, float(steps[-1]) + 0.5, len(labels) - 0.5, -0.5) if len(steps) else None
    im = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap=cmap, norm=LogNorm(lo, hi), extent=extent)
    bad = ~np.isfinite(v)
    if bad.any():
        red = np.ma.masked_where(~bad, np.ones_like(v))
        ax.imshow(red, aspect="auto", interpolation="nearest", cmap=ListedColormap([NONFINITE_COLOR]), extent=extent)
    _style().style_plain(ax.figure.colorbar(im, ax=ax, label=cbar_label).ax)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(list(labels))
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("  [red: NaN/Inf]" if bad.any() else ""))
    ax.grid(False)


def profiles(ax, layers: Sequence[str], rows: dict[str, np.ndarray], title: str,
             ylabel: str = "gradient L2 norm (log)", named: bool = False) -> None:
    """Per-layer gradient-norm profiles: one line per label (e.g. a step or a model) over layer index.

    `named`: every layer's name on the x axis (size the figure with `ROW_INCHES` per layer); else its index.
    """
    idx = np.arange(len(layers))
    for label, values in rows.items():
        v = as_float(values)
        line(ax, idx[: len(v)], v, label=label, log=True, marker="o", markersize=3)
    if named:
        ax.set_xticks(idx)
        ax.set_xticklabels(list(layers), **_tick_style(layers))
    ax.set_xlabel("layer (input side first)" if named else "layer index (0 = input side)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if rows:
        ax.legend(loc="best")


def loss_curve(ax, curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, log: bool = False,
               spikes: Optional[dict[str, Sequence[int]]] = None, events: Optional[dict[str, Sequence[int]]] = None,
               ylabel: str = "training loss", baseline: Optional[tuple[float, str]] = None,
               ylim: Optional[tuple[float, float]] = None) -> None:
    """Loss curves; spikes as orange dots, interventions (e.g. clipping) as purple triangles at the bottom, NaN/Inf red.

    `ylim` fixes the y range (values outside are cut off), so one exploding run does not flatten the others.
    """
    for i, (label, (steps, loss)) in enumerate(curves.items()):
        steps, loss = as_float(steps), as_float(loss)
        color = f"C{i % 10}"
        line(ax, steps, loss, label=label, log=log, color=color, linewidth=1)
        for s in (spikes or {}).get(label, []):
            j = np.searchsorted(steps, s)
            if j < len(steps) and np.isfinite(loss[j]):
                ax.plot(steps[j], loss[j], "o", color="orange", markersize=4, markeredgecolor=color)
        ev = np.asarray((events or {}).get(label, []), dtype=np.float64)
        if ev.size:
            ax.plot(ev, np.full(ev.size, 0.03 + 0.04 * i), "^", color="purple", transform=ax.get_xaxis_transform(),
                    markersize=4, linestyle="none",
                    label=f"intervention ({label})" if len(curves) > 1 else "intervention")
    if baseline is not None:
        ax.axhline(baseline[0], color="black", linestyle="--", linewidth=0.8, label=baseline[1])
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel + (" (log)" if log else ""))
    ax.set_title(title)
    ax.legend(loc="best")


def histogram(ax, values: dict[str, np.ndarray], bins: np.ndarray, title: str, xlabel: str) -> None:
    """Overlaid step histograms of finite values; the count of non-finite values goes in the legend."""
    for label, v in values.items():
        v = as_float(v)
        bad = int((~np.isfinite(v)).sum())
        ax.hist(v[np.isfinite(v)], bins=bins, histtype="step", label=label + (f" ({bad} NaN/Inf)" if bad else ""),
                density=True, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="best")


def bars(ax, labels: Sequence[str], values: dict[str, Sequence[float]], title: str, ylabel: str,
         log: bool = False) -> None:
    """Grouped bars; non-finite values drawn as red hatched bars at the axis top."""
    n = max(1, len(values))
    width = 0.8 / n
    x = np.arange(len(labels))
    for i, (name, vals) in enumerate(values.items()):
        v = as_float(vals)
        ok = np.isfinite(v) & ((v > 0) if log else True)
        ax.bar(x[ok] + i * width - 0.4 + width / 2, v[ok], width, label=name)
        mark_nonfinite(ax, x + i * width - 0.4 + width / 2, v)
    ax.set_xticks(x)
    ax.set_xticklabels(list(labels), **_tick_style(labels))
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(values) > 1:
        ax.legend(loc="best")


def _tick_style(labels: Sequence[str]) -> dict:
    """Rotation for x tick labels: level when short and few; else upright, each in its own column's width."""
    if len(labels) <= 12 and max((len(s) for s in labels), default=0) <= 6:
        return dict(rotation=0)
    return dict(rotation=90)
