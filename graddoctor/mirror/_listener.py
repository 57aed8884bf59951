"""The flush listener that feeds the mirrors: rows from the flush's host arrays, findings as text.

It runs after each flush, on the host arrays the flush just wrote: no device work and no sync of its
own. A mirror that raises is turned off with one warning; training and the other mirrors go on.
"""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._base import Mirror
from ._rows import FINDINGS, RowMaker

if TYPE_CHECKING:
    from ..core._watch import Watch

log = logging.getLogger("graddoctor")


class MirrorListener:
    """Flush listener writing each flush's rows to its mirrors.

    Args:
      mirrors: the mirrors (`graddoctor.mirror.as_mirror`).
      rows: the `RowMaker` of the watch's tensors.
    Attributes:
      off: the mirrors turned off after an error.
    """

    def __init__(self, mirrors: list[Mirror], rows: RowMaker):
        self.mirrors = mirrors
        self.rows = rows
        self.off: list[Mirror] = []
        self._findings: list[tuple[int, str]] = []  # reported during the flush, written with its rows

    @classmethod
    def of_watch(cls, watch: "Watch", mirrors: list[Mirror]) -> "MirrorListener":
        """A listener for `watch`'s tensors; add it with `watch.add_flush_listener` after live diagnosis,
        so that the findings a flush reports are written with that flush's rows."""
        return cls(mirrors, RowMaker(watch.names, watch.config.sample_every,
                                     update_plan=watch.update_snapshot.meta()))

    def __call__(self, watch: "Watch", first: int, last: int, chunks: list) -> None:
        rows = sorted(self.rows.rows(chunks).items())
        findings, self._findings = self._findings, []
        for m in self.live_mirrors():
            self._write(m, rows, findings)

    def finding(self, finding: Any) -> None:
        """Live diagnosis's on_finding: kept, and written by the flush that found it (which runs next)."""
        self._findings.append((int(finding.last_step), finding_text(finding)))

    def live_mirrors(self) -> list[Mirror]:
        return [m for m in self.mirrors if m not in self.off]

    def _write(self, mirror: Mirror, rows: list, findings: list[tuple[int, str]]) -> None:
        try:
            for step, values in rows:
                mirror.scalars(step, values)
            for step, text in findings:
                mirror.text(step, FINDINGS, text)
            mirror.flush()
        except Exception as e:  # a backend's error must never stop a training run
            self.off.append(mirror)
            log.debug("graddoctor: mirror %s failed", type(mirror).__name__, exc_info=True)
            warnings.warn(f"graddoctor: mirror {type(mirror).__name__} failed ({type(e).__name__}: {e}) and is "
                          "turned off for this run; training goes on", RuntimeWarning, stacklevel=2)


def finding_text(f: Any) -> str:
    """One line for a finding: severity, code, steps, cause, message and the first remedies."""
    text = f"{f.severity} {f.code} at steps {f.first_step}-{f.last_step} (cause: {f.cause}): {f.message}"
    if f.remedies:
        text += f" Try: {', '.join(r.id for r in f.remedies[:3])}."
    return text


def chain_on_finding(listener: MirrorListener, user: Optional[Callable]) -> Callable:
    """The on_finding for live diagnosis: the mirrors' first, then the user's own."""
    def on_finding(f: Any) -> None:
        listener.finding(f)
        if user is not None:
            user(f)
    return on_finding
