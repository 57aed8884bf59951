"""Where each run stands (`run_status`), from a few cheap reads of its store, and which runs a folder holds."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Optional

from .._errors import GradDoctorError
from ..store._store import STORE_NAME, open_store, read_last_row, store_path

# How deep below a folder of runs to look for stores: the lab's runs/lab/runs/<experiment>/<variant> is 3.
FIND_DEPTH = 3


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Where one run stands, from a few cheap reads of its store (only the last chunk of two series is decoded).

    Keys: run, state ("waiting": no store yet; "live"; "closed": watch.close() ran; "error"),
    steps (last recorded step + 1), loss and grad_norm (the last recorded loss and global gradient
    norm; NaN and Inf kept, None before the first flush), events (interventions and findings
    written), findings and
    critical (how many findings live diagnosis has written, and how many of them are critical),
    updated (Unix time of the last write, from the store's files), version (changes whenever
    anything is written), error (the reason, for state "error").
    """
    run_dir = Path(run_dir)
    status: dict[str, Any] = {"run": str(run_dir), "state": "waiting", "steps": 0, "events": 0, "findings": 0,
                              "critical": 0, "loss": None, "grad_norm": None, "updated": None,
                              "version": "waiting", "error": None}
    if run_dir.exists() and not run_dir.is_dir():
        return {**status, "state": "error", "version": "error",
                "error": f"{str(run_dir)!r} is a file, not a run directory made by graddoctor.watch"}
    store = store_path(run_dir)
    if not store.exists():
        return status
    try:
        con = open_store(run_dir)
        try:
            chunk_id = con.execute("SELECT max(rowid) FROM chunks").fetchone()[0] or 0
            event_id = con.execute("SELECT max(id) FROM events").fetchone()[0] or 0
            # the last recorded step: every step has a global norm, while a loss may be missing
            last = con.execute("SELECT last_step FROM chunks WHERE series='grad_total_norm' "
                               "ORDER BY first_step DESC LIMIT 1").fetchone()
            loss, norm = _last_value(con, "loss"), _last_value(con, "grad_total_norm")
            closed = con.execute("SELECT value FROM meta WHERE key='closed_at'").fetchone()
            findings = [_severity(d) for (d,) in con.execute("SELECT data FROM events WHERE kind='finding'")]
            created = con.execute("SELECT value FROM meta WHERE key='created'").fetchone()
        finally:
            con.close()
    except (GradDoctorError, sqlite3.DatabaseError) as e:
        return {**status, "state": "error", "version": "error", "error": str(e)}
    files = [store, store.with_name(store.name + "-wal")]  # WAL mode: a flush lands in the -wal file first
    updated = max((f.stat().st_mtime for f in files if f.exists()), default=None)
    return {**status, "state": "closed" if closed else "live", "steps": (last[0] + 1) if last else 0,
            "events": event_id, "updated": updated, "loss": loss, "grad_norm": norm,
            "findings": len(findings), "critical": sum(sev == "critical" for sev in findings),
            # `created` tells a run recorded again into the same directory (overwrite) from the old one.
            "version": f"{created[0] if created else ''}:{chunk_id}:{event_id}:{bool(closed)}"}


def find_runs(path: str | Path) -> list[Path]:
    """`path` if it is a run directory (or not written yet); else the runs in the folders below it.

    A folder given to `serve` may be a single run or, as TensorBoard's log directory, a folder of
    runs: a directory without a store of its own is searched up to FIND_DEPTH levels down, again
    at every poll, so a run started later appears on the page. A folder with no run below it is
    taken as a run that watch has not written yet.
    """
    path = Path(path)
    if store_path(path).exists() or not path.is_dir():
        return [path]
    found = sorted({store.parent for depth in range(1, FIND_DEPTH + 1)
                    for store in path.glob("/".join(["*"] * depth + [STORE_NAME]))})
    return found or [path]


def _last_value(con: sqlite3.Connection, series: str) -> Optional[float]:
    """The last recorded value of a one-column series (loss, global norm), or None."""
    row = read_last_row(con, series)
    return float(row[0]) if row is not None else None


def _severity(data: str) -> str:
    try:
        return str(json.loads(data).get("severity", ""))
    except (ValueError, AttributeError):  # an event written by something else: count it, severity unknown
        return ""


def _number(x: float) -> str:
    from ..report._html import fmt  # NaN and Inf spelled out, as everywhere in the report
    return fmt(x)


def status_text(runs: list[dict[str, Any]]) -> str:
    """One line for the status bar: each run's state, or for more than 3 runs a summary of them."""
    if len(runs) > 3:
        states = [r["state"] for r in runs]
        counts = ", ".join(f"{states.count(k)} {word}" for k, word in
                           (("live", "live"), ("closed", "finished"), ("waiting", "waiting"), ("error", "unreadable"))
                           if states.count(k))
        found, critical = sum(r["findings"] for r in runs), sum(r["critical"] for r in runs)
        latest = max((r["updated"] for r in runs if r["updated"]), default=None)
        when = time.strftime("%H:%M:%S", time.localtime(latest)) if latest else "?"
        return (f"{len(runs)} runs: {counts}; {found} live finding{'s' if found != 1 else ''}"
                f"{f' ({critical} critical)' if critical else ''}; last written {when}")
    parts = []
    for r in runs:
        if r["state"] == "waiting":
            parts.append(f"{r['run']}: waiting for the first flush")
        elif r["state"] == "error":
            parts.append(f"{r['run']}: cannot be read")
        else:
            when = time.strftime("%H:%M:%S", time.localtime(r["updated"])) if r["updated"] else "?"
            found = (f", {r['findings']} live finding{'s' if r['findings'] != 1 else ''}"
                     f"{' (' + str(r['critical']) + ' critical)' if r['critical'] else ''}" if r["findings"] else "")
            values = "".join(f", {name} {_number(r[key])}"
                             for key, name in (("loss", "loss"), ("grad_norm", "grad norm")) if r[key] is not None)
            parts.append(f"{r['run']}: {r['steps']} steps, {'finished' if r['state'] == 'closed' else 'live'}"
                         f"{values}, last written {when}{found}")
    return " · ".join(parts)
