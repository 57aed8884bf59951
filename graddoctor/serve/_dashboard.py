"""`Dashboard`: what the server serves, the page, the runs' status and their sections, drawn when they change."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .._errors import ConfigError, GradDoctorError
from ..store._store import store_path
from . import _page
from ._status import find_runs, run_status, status_text
from ._views import run_views

DEFAULT_REFRESH = 5.0
DEFAULT_BUSY = 0.1  # the largest share of one core the server spends redrawing (see Dashboard)
FIRST_DRAW_SECONDS = 1.0  # how long one answer may spend drawing runs not drawn before (see Dashboard.content)


@dataclass
class _Drawn:
    """A run's section as last drawn."""

    version: str    # the store's version it shows
    html: str


class Dashboard:
    """What the server serves: the page, the status of the runs, and their sections (cached).

    A run's section is drawn again only when its store changed, and then no sooner than the
    last drawing's cost allows: with `busy=0.1`, after a drawing that took 1 s no run is drawn
    again for 9 s, so the server spends at most ~10% of a core redrawing while the training
    it watches runs beside it (a long run's heat map takes seconds: BENCHMARKS.md).
    Answers draw in their own threads, with no lock of the dashboard's around drawing: the
    report's figures are matplotlib objects of their own (no pyplot), and the report renders
    them one at a time where matplotlib needs it (report/_style.py). Each run has a lock, so
    that two browsers polling at once cost one drawing of a run, not two: the second waits for
    the first and then takes its section from the cache.
    """

    def __init__(self, run_dirs: Sequence[str | Path], refresh: float = DEFAULT_REFRESH, busy: float = DEFAULT_BUSY):
        if not run_dirs:
            raise ConfigError("no run directory given: pass at least one RUN_DIR")
        if isinstance(refresh, bool) or not isinstance(refresh, (int, float)) or not (0 < refresh < math.inf):
            raise ConfigError(f"refresh={refresh!r} is not allowed: use a number of seconds > 0")
        if isinstance(busy, bool) or not isinstance(busy, (int, float)) or not (0 < busy <= 1):
            raise ConfigError(f"busy={busy!r} is not allowed: use a share of one core, > 0 and <= 1")
        self.run_dirs = [Path(r) for r in run_dirs]
        for r in self.run_dirs:
            if r.exists() and not r.is_dir():
                raise ConfigError(f"{str(r)!r} is a file: give run directories made by graddoctor.watch")
        self.refresh, self.busy = float(refresh), float(busy)
        self._drawn: dict[Path, _Drawn] = {}
        self._run_locks: dict[Path, threading.Lock] = {}  # one per run: held while its section is drawn
        self._locks_lock = threading.Lock()  # guards `_run_locks` only, never held while drawing
        self._last_drawing = (0.0, 0.0)  # when the last drawing ended (time.monotonic()), and its seconds
        self.first_draw_seconds = FIRST_DRAW_SECONDS

    def runs(self) -> list[Path]:
        """The run directories shown now: each given one, or the runs found below a folder of runs."""
        return [run for given in self.run_dirs for run in find_runs(given)]

    def status(self) -> dict[str, Any]:
        runs = [run_status(r) for r in self.runs()]
        return {"runs": runs, "version": "|".join(r["version"] for r in runs), "text": status_text(runs),
                "critical": sum(r["critical"] for r in runs), "refresh": self.refresh}

    def views(self) -> dict[str, Any]:
        """`/views`: per run shown, the numbers behind its plots (`run_views`), or its state and why there are none."""
        out = []
        for status in self.status()["runs"]:
            run = Path(status["run"])
            if status["state"] in ("waiting", "error"):
                out.append({"run": str(run), "state": status["state"], "error": status["error"]})
                continue
            try:
                out.append({"state": status["state"], **run_views(run)})
            except GradDoctorError as e:  # a store damaged under a live status: the reason, the other runs served
                out.append({"run": str(run), "state": "error", "error": str(e)})
        return {"runs": out}

    def content(self) -> tuple[str, str]:
        """The runs' sections, and the version they show (the status's version once all are current).

        One answer draws runs never drawn before for up to `first_draw_seconds` (at least one), and
        redraws at most one changed run, when the busy budget allows; the others come from the cache
        or as a placeholder (version "pending", which the page asks again for at once). So a folder
        of many runs fills the page run by run instead of answering after minutes.
        """
        budget = {"until": time.monotonic() + self.first_draw_seconds, "new": 0, "redrawn": 0}
        parts = [self._section(s, budget) for s in self.status()["runs"]]
        return "".join(html for html, _ in parts), "|".join(version for _, version in parts)

    def _run_lock(self, run: Path) -> threading.Lock:
        with self._locks_lock:
            return self._run_locks.setdefault(run, threading.Lock())

    def _section(self, status: dict[str, Any], budget: dict[str, float]) -> tuple[str, str]:
        """One run's section and the version it shows; `budget` is this answer's (see `content`)."""
        from ..report import _html as H
        run = Path(status["run"])
        if status["state"] == "waiting":
            return (_note(run, "muted", f"waiting for graddoctor.watch to write <code>{H.esc(store_path(run))}</code> "
                                        "(its first flush)…"), status["version"])
        if status["state"] == "error":
            return _unreadable(run, status["error"]), status["version"]
        with self._run_lock(run):
            return self._drawn_section(run, status, budget)

    def _drawn_section(self, run: Path, status: dict[str, Any], budget: dict[str, float]) -> tuple[str, str]:
        """`_section` of a readable run, its lock held: from the cache, a placeholder, or drawn now."""
        last, now = self._drawn.get(run), time.monotonic()
        ended, seconds = self._last_drawing
        if last is not None and (last.version == status["version"] or budget["redrawn"]
                                 or now < ended + seconds * (1 / self.busy - 1)):
            return last.html, last.version
        if last is None and budget["new"] and now >= budget["until"]:
            return _note(run, "muted", "drawing the runs one by one…"), "pending"
        budget["new" if last is None else "redrawn"] += 1
        from ..report._pages import run_section
        try:
            html = run_section(run)
        except Exception as e:  # noqa: BLE001 - one run that cannot be drawn must not take the page down
            return _unreadable(run, f"{type(e).__name__}: {e}"), "error"
        self._drawn[run] = _Drawn(status["version"], html)
        self._last_drawing = (time.monotonic(), time.monotonic() - now)
        return html, status["version"]

    def page(self) -> str:
        from ..report import _html as H
        status = self.status()
        content, version = self.content()
        return _page.render(status=H.esc(status["text"]), version=H.esc(version),
                            bar_class="critical" if status["critical"] else "",
                            refresh_ms=str(min(int(self.refresh * 1000), 2**31 - 1)),  # setTimeout's largest
                            content=content,
                            title=H.esc("graddoctor · " + ", ".join(str(r) for r in self.run_dirs)))


def _note(run: Path, css_class: str, html: str) -> str:
    """A run's section that holds one line instead of its plots (`html` is already escaped)."""
    from ..report import _html as H
    return f"<section><h2>{H.esc(run)}</h2><p class=\"{css_class}\">{html}</p></section>"


def _unreadable(run: Path, reason: str) -> str:
    from ..report import _html as H
    return _note(run, "no", f"cannot read this run: {H.esc(reason)}")
