"""The report's matplotlib figures: `Figure` objects on the Agg canvas, in the report's style.

A library must not change its caller's matplotlib: pyplot is never imported (it would pick a
backend), and the style (small type, a light grid) lives on each figure's own axes
(`StyledAxes`), never in the global rcParams. Imported on the first drawing only: matplotlib
is an optional dependency.

Threads: each figure is its own object, so figures are built in parallel (the dashboard answers
each request in its own thread), but they are rendered one at a time: matplotlib's mathtext
parser, which lays out the 10^k labels of a log axis, is one object for the whole process and
breaks when two threads parse at once (tests/test_serve.py draws in four threads).
"""
from __future__ import annotations

import io
import threading
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

DPI = 90
# In points: small type, so that two plots fit side by side on a page.
FONT_SIZE = 8  # tick labels, axis labels, annotations
TITLE_SIZE = 9
LEGEND_SIZE = 7
GRID_ALPHA = 0.3
_RENDERING = threading.Lock()  # held while a figure is laid out and rendered (see the module's docstring)


def sized(kwargs: dict[str, Any], size: float) -> dict[str, Any]:
    """`kwargs` with `fontsize=size` added, unless the caller chose a size."""
    if not {"fontsize", "size", "prop"} & kwargs.keys():
        kwargs["fontsize"] = size
    return kwargs


class StyledAxes(Axes):
    """Axes whose texts default to the report's sizes, with the grid on.

    This does per figure what a global rcParams update would do for the whole process.
    """

    name = "graddoctor"

    def clear(self) -> None:
        super().clear()
        style_plain(self, grid=True)

    def set_title(self, *args: Any, **kwargs: Any):
        return super().set_title(*args, **sized(kwargs, TITLE_SIZE))

    def set_xlabel(self, *args: Any, **kwargs: Any):
        return super().set_xlabel(*args, **sized(kwargs, FONT_SIZE))

    def set_ylabel(self, *args: Any, **kwargs: Any):
        return super().set_ylabel(*args, **sized(kwargs, FONT_SIZE))

    def legend(self, *args: Any, **kwargs: Any):
        return super().legend(*args, **sized(kwargs, LEGEND_SIZE))

    def text(self, *args: Any, **kwargs: Any):
        return super().text(*args, **sized(kwargs, FONT_SIZE))

    def annotate(self, *args: Any, **kwargs: Any):
        return super().annotate(*args, **sized(kwargs, FONT_SIZE))


def style_plain(ax: Axes, grid: bool = False) -> None:
    """The report's sizes (and `grid`) on axes that matplotlib makes itself (a colorbar's, a twin's)."""
    if grid:
        ax.grid(True, alpha=GRID_ALPHA)
    ax.tick_params(which="both", labelsize=FONT_SIZE)
    for axis in (ax.xaxis, ax.yaxis):
        axis.offsetText.set_fontsize(FONT_SIZE)  # the "1e-5" at the end of an axis
        axis.label.set_fontsize(FONT_SIZE)


def new_figure(ncols: int, width: float, height: float) -> tuple[Figure, list[StyledAxes]]:
    """A figure of `ncols` report-styled axes side by side, each `width` x `height` inches."""
    fig = Figure(figsize=(width * ncols, height), dpi=DPI)
    FigureCanvasAgg(fig)  # the figure renders itself: no pyplot, no backend
    axes = fig.subplots(1, ncols, squeeze=False, subplot_kw={"axes_class": StyledAxes})
    return fig, list(axes[0])


def png(fig: Figure) -> bytes:
    """The figure laid out and rendered as PNG."""
    buf = io.BytesIO()
    with _RENDERING:
        # tight_layout's padding is a fraction of rcParams' font size, the caller's: 1.08 (its default) of ours.
        fig.tight_layout(pad=1.08 * FONT_SIZE / FontProperties().get_size_in_points())
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
