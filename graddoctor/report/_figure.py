"""Figure: one rendered plot, ready to inline in HTML."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Figure:
    """A rendered plot: `data` is an inline `data:image/png;base64,...` URI; `caption` says what to see."""

    title: str
    data: str
    caption: str = ""
