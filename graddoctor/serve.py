"""`serve`: a live local dashboard of runs while they are recorded.

    graddoctor serve runs/exp1 [runs/exp2 ...] [--host 127.0.0.1] [--port 8765] [--refresh 5] [--busy 0.1]
                                               [--token TOKEN | --no-token] [--certfile PEM [--keyfile PEM]]

or from Python (a notebook, a test):

    dash = graddoctor.serve.start(["runs/exp1"], port=0)   # port 0: any free port
    print(dash.link)   # the address to open (with its token, if one is asked)
    ...
    dash.stop()

The page shows what `graddoctor report` writes (gradient-flow heat map, layer profiles, loss,
activations, and diagnose's findings with their remedies) for the runs as they are now, and keeps
itself current: every `refresh` seconds the browser asks for `/status` (a few indexed SQLite reads
per run), and only when a run's store has changed does it fetch `/content` and swap it in place,
keeping the scroll position. A run's plots are drawn again at most as often as keeps the server
below `busy` (default 10%) of one core. So a run that stalls or blows up shows up on the page at
the next flush of `watch` (every `flush_every` steps), with its finding.

Why polling and whole sections: the store is written by another process, in WAL mode, so a
read-only reader never blocks the training (DESIGN.md); and re-drawing the report's plots only
when a flush has landed costs the server about as much as one `graddoctor report` per flush.

Routes (GET): `/` the page; `/status` JSON (per run: whether it exists, last step, last loss and
global gradient norm, whether watch has closed it, when the store was last written, live findings;
non-finite floats spelled "NaN"/"Infinity" as in the rest of graddoctor's JSON); `/content` the
runs' sections as an HTML fragment. Nothing is
fetched from the network: the page's plots are inline PNG, its script and style are inline.
Every answer says nosniff, no framing, and a Content-Security-Policy: the page's allows its own script and
style (by sha256), data: images and polls to its own origin; every other answer's allows nothing.

Who may read it: on a loopback address (the default, 127.0.0.1) anyone on this machine, as with
TensorBoard. On any other address the server asks for a token, random unless given, as Jupyter
does: the printed address carries it (`?token=...`), and the page, once opened with it, keeps it in
a cookie for its polls. Every other request is refused with 403. A loopback server without a token
answers only requests addressed to a localhost name (the Host header), so that a web page elsewhere
cannot read it through the browser by pointing a name of its own at 127.0.0.1 (DNS rebinding).
With `--certfile` (and `--keyfile`, unless the key is in the same PEM file) the server speaks HTTPS
only, so the token and the runs cross the network encrypted; the token's cookie is then marked Secure.
A client that speaks plain HTTP to it is answered 400 with what to open instead; one that fails the
TLS handshake is dropped; neither stops the server.

A run directory that does not exist yet is allowed: the page says it is waiting for `watch` to
create it (start the dashboard before the training). A folder of runs (`graddoctor serve runs/`)
shows every run found below it, and runs started later appear as they write their first flush.
A store that cannot be read is shown as an error on the page, and the server keeps serving the
other runs.
"""
from __future__ import annotations

import argparse
import base64
import errno
import functools
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import socket
import sqlite3
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import parse_qs

from ._errors import ConfigError, GradDoctorError
from .store._nonfinite_json import encode_nonfinite
from .store._store import STORE_NAME, open_store, read_last_row, store_path

DEFAULT_PORT = 8765
DEFAULT_REFRESH = 5.0
MIN_REFRESH = 0.5  # the CLI's floor: every browser left open polls this often (the API allows less, for tests)
DEFAULT_BUSY = 0.1  # the largest share of one core the server spends redrawing (see Dashboard)
FIRST_DRAW_SECONDS = 1.0  # how long one answer may spend drawing runs not drawn before (see Dashboard.content)


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


# How deep below a folder of runs to look for stores: the lab's runs/lab/runs/<experiment>/<variant> is 3.
FIND_DEPTH = 3


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
    Drawing is serialized by a lock: the report's plots use pyplot, whose state is global, and
    two browsers polling at once should cost one drawing, not two.
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
        self._lock = threading.Lock()
        self._drawn: dict[Path, _Drawn] = {}
        self._last_drawing = (0.0, 0.0)  # when the last drawing ended (time.monotonic()), and its seconds
        self.first_draw_seconds = FIRST_DRAW_SECONDS

    def runs(self) -> list[Path]:
        """The run directories shown now: each given one, or the runs found below a folder of runs."""
        return [run for given in self.run_dirs for run in find_runs(given)]

    def status(self) -> dict[str, Any]:
        runs = [run_status(r) for r in self.runs()]
        return {"runs": runs, "version": "|".join(r["version"] for r in runs), "text": _status_text(runs),
                "critical": sum(r["critical"] for r in runs), "refresh": self.refresh}

    def content(self) -> tuple[str, str]:
        """The runs' sections, and the version they show (the status's version once all are current).

        One answer draws runs never drawn before for up to `first_draw_seconds` (at least one), and
        redraws at most one changed run, when the busy budget allows; the others come from the cache
        or as a placeholder (version "pending", which the page asks again for at once). So a folder
        of many runs fills the page run by run instead of answering after minutes.
        """
        with self._lock:
            budget = {"until": time.monotonic() + self.first_draw_seconds, "new": 0, "redrawn": 0}
            parts = [self._section(s, budget) for s in self.status()["runs"]]
        return "".join(html for html, _ in parts), "|".join(version for _, version in parts)

    def _section(self, status: dict[str, Any], budget: dict[str, float]) -> tuple[str, str]:
        """One run's section and the version it shows; `budget` is this answer's (see `content`)."""
        from .report import _html as H
        run = Path(status["run"])
        if status["state"] == "waiting":
            return (_note(run, "muted", f"waiting for graddoctor.watch to write <code>{H.esc(store_path(run))}</code> "
                                        "(its first flush)…"), status["version"])
        if status["state"] == "error":
            return _unreadable(run, status["error"]), status["version"]
        last, now = self._drawn.get(run), time.monotonic()
        ended, seconds = self._last_drawing
        if last is not None and (last.version == status["version"] or budget["redrawn"]
                                 or now < ended + seconds * (1 / self.busy - 1)):
            return last.html, last.version
        if last is None and budget["new"] and now >= budget["until"]:
            return _note(run, "muted", "drawing the runs one by one…"), "pending"
        budget["new" if last is None else "redrawn"] += 1
        from .report._pages import run_section
        try:
            html = run_section(run)
        except Exception as e:  # noqa: BLE001 - one run that cannot be drawn must not take the page down
            return _unreadable(run, f"{type(e).__name__}: {e}"), "error"
        self._drawn[run] = _Drawn(status["version"], html)
        self._last_drawing = (time.monotonic(), time.monotonic() - now)
        return html, status["version"]

    def page(self) -> str:
        from .report import _html as H
        status = self.status()
        content, version = self.content()
        return _PAGE.format(css=H.CSS + _CSS, script=_SCRIPT, status=H.esc(status["text"]), version=H.esc(version),
                            bar_class="critical" if status["critical"] else "",
                            refresh_ms=min(int(self.refresh * 1000), 2**31 - 1),  # setTimeout's largest
                            content=content,
                            title=H.esc("graddoctor · " + ", ".join(str(r) for r in self.run_dirs)))


def _last_value(con: sqlite3.Connection, series: str) -> Optional[float]:
    """The last recorded value of a one-column series (loss, global norm), or None."""
    row = read_last_row(con, series)
    return float(row[0]) if row is not None else None


def _note(run: Path, css_class: str, html: str) -> str:
    """A run's section that holds one line instead of its plots (`html` is already escaped)."""
    from .report import _html as H
    return f"<section><h2>{H.esc(run)}</h2><p class=\"{css_class}\">{html}</p></section>"


def _unreadable(run: Path, reason: str) -> str:
    from .report import _html as H
    return _note(run, "no", f"cannot read this run: {H.esc(reason)}")


def _severity(data: str) -> str:
    try:
        return str(json.loads(data).get("severity", ""))
    except (ValueError, AttributeError):  # an event written by something else: count it, severity unknown
        return ""


def _number(x: float) -> str:
    from .report._html import fmt  # NaN and Inf spelled out, as everywhere in the report
    return fmt(x)


def _status_text(runs: list[dict[str, Any]]) -> str:
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


_CSS = """
#bar{position:sticky;top:0;z-index:1;background:#1d1d1f;color:#fff;padding:6px 24px;font-size:13px}
#bar b{margin-right:8px} #bar .err{color:#ff8a80} #bar.critical{background:#8e1b14}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>{title}</title><style>{css}</style></head>
<body data-version="{version}" data-refresh="{refresh_ms}">
<div id="bar" class="{bar_class}"><b>graddoctor serve</b><span id="status">{status}</span></div>
<main id="content">{content}</main>
<script>{script}</script>
</body></html>
"""

# The page's only script: poll /status, fetch /content when the version changed, swap it in place.
# `data-version` is the version of the content on the page. The script is the same on every page
# (its settings are in data- attributes), so the Content-Security-Policy can allow it by its hash.
_SCRIPT = """
(function () {
  const statusEl = document.getElementById("status"), content = document.getElementById("content");
  const refresh = Number(document.body.dataset.refresh);  // milliseconds between polls
  // "pending" in the version: runs the server has not drawn yet, one answer at a time; ask again at once.
  const pending = () => document.body.dataset.version.split("|").includes("pending");
  async function poll() {
    let answered = true;
    try {
      const s = await (await fetch("status", {cache: "no-store"})).json();
      if (s.version !== document.body.dataset.version) {
        // The answer says which version it shows: a changed run drawn again only when the
        // server's drawing budget allows (see Dashboard) is asked for again at a later poll.
        const c = await fetch("content", {cache: "no-store"});
        const html = await c.text(), shown = c.headers.get("X-Graddoctor-Version");
        if (shown !== document.body.dataset.version) {
          const y = window.scrollY;
          content.innerHTML = html;
          window.scrollTo(0, y);
          document.body.dataset.version = shown;
        }
      }
      statusEl.textContent = s.text;
      statusEl.className = "";
      document.getElementById("bar").className = s.critical ? "critical" : "";
    } catch (e) {
      statusEl.textContent = "the graddoctor server does not answer (" + e.message + "); retrying";
      statusEl.className = "err";
      answered = false;
    }
    setTimeout(poll, answered && pending() ? 0 : refresh);
  }
  setTimeout(poll, pending() ? 0 : refresh);
})();
"""


# Content-Security-Policy: every answer but the page (and its /content) allows nothing at all.
_FRAMING = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
_LOCKED = "default-src 'none'; " + _FRAMING


@functools.lru_cache(maxsize=None)
def _page_policy() -> str:
    """The page's policy: its one script and style (by sha256; no other inline code), data: images, polls home."""
    from .report import _html as H
    script, style = ("'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
                     for text in (_SCRIPT, H.CSS + _CSS))
    return f"default-src 'none'; script-src {script}; style-src {style}; img-src data:; connect-src 'self'; {_FRAMING}"


_PLAIN_HTTP_REFUSAL = ("HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                       f"X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nContent-Security-Policy: {_LOCKED}"
                       "\r\n\r\nthis dashboard speaks HTTPS only: open the https:// address graddoctor serve printed\n"
                       ).encode()


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the subclass made by `start`
    token: Optional[str] = None  # asked of every request when set (see `start`)
    loopback_only = False  # on a loopback address without a token: answer localhost Host headers only
    tls_context: Optional[ssl.SSLContext] = None  # set: HTTPS only, and the token's cookie is marked Secure
    verbose = False
    # Seconds a connection may sit idle (or mid-handshake) before its thread gives it up.
    timeout = 60
    csp = _LOCKED  # the Content-Security-Policy of the answer being sent (`_send` sets the page's)

    def setup(self) -> None:
        # TLS is set up here, in the connection's own thread, not on accept: one slow client
        # cannot hold up the others, and a plain-HTTP client can be told what to open instead.
        if self.tls_context is not None:
            self.request.settimeout(self.timeout)
            first = self.request.recv(1, socket.MSG_PEEK)
            if not first:
                raise ConnectionAbortedError("closed before sending anything")
            if first != b"\x16":  # not a TLS handshake record: most likely plain HTTP
                self.request.sendall(_PLAIN_HTTP_REFUSAL)
                raise ConnectionAbortedError("plain HTTP sent to the HTTPS dashboard")
            self.request = self.tls_context.wrap_socket(self.request, server_side=True)
        super().setup()

    def finish(self) -> None:
        super().finish()
        if isinstance(self.request, ssl.SSLSocket):  # the server closes only the socket it accepted
            self.request.close()

    @property
    def tls(self) -> bool:
        return self.tls_context is not None

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        path = self.path.split("?", 1)[0]
        try:
            hosts = self.headers.get_all("Host") or [""]
            host = _host_name(hosts[0]) if len(hosts) == 1 else None
            refused = self._refusal(host) if host is not None else None
            if host is None:
                self._send(HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", f"bad Host header "
                           f"{_shown(', '.join(hosts))}: expected a name or an address, optionally with :port\n")
            elif refused is not None:
                self._send(HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8", refused)
            elif path == "/":
                secure = "; Secure" if self.tls else ""
                cookie = {"Set-Cookie": f"{self._cookie_name()}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"}
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.dashboard.page(),
                           cookie if self.token is not None else None)
            elif path == "/status":
                body = json.dumps(encode_nonfinite(self.dashboard.status()), allow_nan=False)
                self._send(HTTPStatus.OK, "application/json", body)
            elif path == "/content":
                html, version = self.dashboard.content()
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", html, {"X-Graddoctor-Version": version})
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                           f"no page {_shown(path)}: this server has /, /status and /content\n")
        except (BrokenPipeError, ConnectionResetError):  # the browser went away mid-answer
            pass

    def _refusal(self, host: str) -> Optional[str]:
        """Why this request, to `host` (its Host header's name), may not read the dashboard (the 403's text), or None."""
        # A web page elsewhere can point a name it controls at 127.0.0.1 (DNS rebinding) and read
        # an open local server through the visitor's browser; its requests carry that name as Host.
        if self.loopback_only and not _is_loopback(host):
            return (f"this dashboard answers to localhost names only, not Host: {_shown(self.headers.get('Host', ''))} "
                    f"(a page elsewhere may be trying to read it); open it as "
                    f"{'https' if self.tls else 'http'}://localhost:{self.server.server_address[1]}/\n")
        if self.token is not None:
            given = self._given_token()
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return ("this dashboard asks for its token: open the address graddoctor serve printed "
                        "(it ends in ?token=...)\n")
        return None

    def _cookie_name(self) -> str:
        # Cookies are not kept per port: a name per port keeps two dashboards on one host apart.
        return f"graddoctor_token_{self.server.server_address[1]}"

    def _given_token(self) -> Optional[str]:
        """The token in the query (`?token=`), else in the page's cookie; None if neither."""
        query = parse_qs(self.path.partition("?")[2]).get("token")
        if query:
            return query[0]
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self._cookie_name())
        except CookieError:
            return None
        return morsel.value if morsel is not None else None

    def _send(self, code: HTTPStatus, kind: str, body: str, headers: Optional[dict[str, str]] = None) -> None:
        data = body.encode("utf-8", "replace")  # a run directory's name may not be UTF-8 (bytes from a shell)
        self.csp = _page_policy() if kind.startswith("text/html") else _LOCKED
        self.send_response(code)
        self.send_header("Content-Type", kind)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def end_headers(self) -> None:
        # Every answer, http.server's own errors (400, 501, ...) included: no sniffing, no framing, its policy.
        for name, value in (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                            ("Content-Security-Policy", self.csp)):
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        if self.verbose:
            super().log_message(format, *args)


class Server:
    """A running dashboard server (see `start`)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: Optional[threading.Thread], dashboard: Dashboard):
        self._httpd, self._thread, self.dashboard = httpd, thread, dashboard
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        self.tls = httpd.RequestHandlerClass.tls_context is not None  # type: ignore[attr-defined]
        scheme = "https" if self.tls else "http"
        self.url = f"{scheme}://{'localhost' if self.host in ('127.0.0.1', '::1') else self.host}:{self.port}/"
        self.token: Optional[str] = httpd.RequestHandlerClass.token  # type: ignore[attr-defined]
        # the address to open: the page with its token, which it then keeps in a cookie
        self.link = self.url + (f"?token={self.token}" if self.token is not None else "")

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _host_name(header: str) -> Optional[str]:
    """The name or address in a Host header (an RFC 3986 reg-name or IPv4, or an [IPv6], then :port), in lower
    case and IPv6 without brackets; None if it is malformed."""
    m = re.fullmatch(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._~!$&'()*+,;=%-]*))(?::[0-9]*)?", header.strip().lower())
    try:
        return None if m is None else m[2] if m[1] is None else str(ipaddress.IPv6Address(m[1]))
    except ValueError:  # brackets around something that is not an IPv6 address
        return None


def _shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, cut short past `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _token(token: Optional[str], host: str) -> Optional[str]:
    """The token the server asks for: `token` itself, or for "auto" none on loopback and a random one elsewhere."""
    if token == "auto":
        return None if _is_loopback(host) else secrets.token_urlsafe(16)
    if token is not None and not (isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9._~-]+", token)):
        raise ConfigError(f"token={token!r} is not allowed: use letters, digits and . _ ~ - (at least one), "
                          f"'auto' (none on a loopback host, a random one elsewhere) or None (no token)")
    return token


def _tls_context(certfile: Optional[str | Path], keyfile: Optional[str | Path]) -> Optional[ssl.SSLContext]:
    """A server TLS context from PEM files, or None for plain HTTP; a bad file is refused by name."""
    if certfile is None:
        if keyfile is not None:
            raise ConfigError(f"keyfile={str(keyfile)!r} was given without certfile: give the certificate "
                              "(--certfile) too, or neither for plain HTTP")
        return None
    for what, path in (("certfile", certfile), ("keyfile", keyfile)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{what}={str(path)!r} is not a file: give a PEM file "
                              f"({'the certificate chain' if what == 'certfile' else 'its private key'})")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    key_path = keyfile if keyfile is not None else certfile

    def no_passphrase() -> str:
        # Without this OpenSSL would ask for the passphrase on the terminal, and a notebook or a
        # background server would hang there.
        raise ConfigError(f"the private key in {str(key_path)!r} is encrypted (it asks for a passphrase): give an "
                          f"unencrypted one, e.g. `openssl pkey -in {key_path} -out key.pem`, readable by you only")

    try:
        context.load_cert_chain(str(certfile), str(keyfile) if keyfile is not None else None, password=no_passphrase)
    except ssl.SSLError as e:
        key = f" with keyfile={str(keyfile)!r}" if keyfile is not None else " (no keyfile: the key must be in it)"
        raise ConfigError(f"certfile={str(certfile)!r}{key} cannot be used for TLS ({e.reason or e}): give a PEM "
                          "certificate and the PEM private key that belongs to it") from e
    return context


class _DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that speaks plain HTTP to HTTPS, fails the handshake, or goes away is its own
        # problem: one line with --verbose, no traceback, and the server keeps serving.
        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, ConnectionError, socket.timeout)):
            if self.RequestHandlerClass.verbose:  # type: ignore[attr-defined]
                print(f"graddoctor serve: dropped {client_address[0]}: {error}", file=sys.stderr)
            return
        super().handle_error(request, client_address)


def _bind(run_dirs: Sequence[str | Path], host: str, port: int, refresh: float, busy: float, verbose: bool,
          token: Optional[str], certfile: Optional[str | Path] = None,
          keyfile: Optional[str | Path] = None) -> tuple[ThreadingHTTPServer, Dashboard]:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r} is not allowed: use an integer from 1 to 65535, or 0 for any free port")
    dashboard = Dashboard(run_dirs, refresh, busy)
    token = _token(token, host)
    context = _tls_context(certfile, keyfile)
    handler = type("DashboardHandler", (_Handler,), {"dashboard": dashboard, "verbose": verbose, "token": token,
                                                    "loopback_only": token is None and _is_loopback(host),
                                                    "tls_context": context})
    try:
        httpd = _DashboardHTTPServer((host, port), handler)
    except OSError as e:  # a port in use or reserved; else an address (IPv6 too) or name that is not this machine's
        advice = ("pick another --port, or 0 for any free port" if e.errno in (errno.EADDRINUSE, errno.EACCES) else
                  "give --host an IPv4 address or name of this machine, e.g. 127.0.0.1, or 0.0.0.0 for all")
        raise GradDoctorError(f"cannot listen on {host}:{port} ({e.strerror or e}); {advice}") from e
    return httpd, dashboard


def start(run_dirs: Sequence[str | Path], host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          refresh: float = DEFAULT_REFRESH, busy: float = DEFAULT_BUSY, verbose: bool = False,
          token: Optional[str] = "auto", certfile: Optional[str | Path] = None,
          keyfile: Optional[str | Path] = None) -> Server:
    """Serve the dashboard from a background thread; returns the `Server` (`.link`, `.url`, `.stop()`).

    Args:
      run_dirs: run directories written (or about to be written) by `graddoctor.watch`.
      host: the address to listen on; the default serves this machine only.
      port: the TCP port; 0 picks a free one (read it from `.port` / `.url`).
      refresh: seconds between the page's status polls.
      busy: the largest share of one core spent drawing sections (see `Dashboard`); 1: draw on every change.
      verbose: log every request to stderr.
      token: asked of every request (in `?token=`, then in the cookie the page gets): "auto" (the
        default) asks none on a loopback host and a random one on any other; None asks none.
        `Server.link` is the address to open, token included.
      certfile, keyfile: PEM files of a TLS certificate (chain) and its private key: serve HTTPS only.
        keyfile may be left out when the key is in certfile. None (the default): plain HTTP.
    """
    httpd, dashboard = _bind(run_dirs, host, port, refresh, busy, verbose, token, certfile, keyfile)
    thread = threading.Thread(target=httpd.serve_forever, name="graddoctor-serve", daemon=True)
    thread.start()
    return Server(httpd, thread, dashboard)


def serve_forever(run_dirs: Sequence[str | Path], host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                  refresh: float = DEFAULT_REFRESH, busy: float = DEFAULT_BUSY, verbose: bool = False,
                  token: Optional[str] = "auto", certfile: Optional[str | Path] = None,
                  keyfile: Optional[str | Path] = None) -> None:
    """Serve the dashboard in this thread until interrupted (Ctrl-C); arguments as `start`."""
    httpd, dashboard = _bind(run_dirs, host, port, refresh, busy, verbose, token, certfile, keyfile)
    server = Server(httpd, None, dashboard)
    print(f"graddoctor serve: {server.link} (Ctrl-C to stop)", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def register(sub: argparse._SubParsersAction) -> None:
    """The `graddoctor serve` sub-command."""
    p = sub.add_parser("serve", help="a live local dashboard of runs while they train (report views, findings)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories written by graddoctor.watch, or folders of them (searched 3 levels down, "
                        "again at every refresh); one that does not exist yet is waited for")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"TCP port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--refresh", type=float, default=DEFAULT_REFRESH,
                   help=f"seconds between the page's checks for new data (default {DEFAULT_REFRESH:g}; "
                        f"at least {MIN_REFRESH:g})")
    p.add_argument("--busy", type=float, default=DEFAULT_BUSY,
                   help=f"largest share of one core spent re-drawing plots "
                        f"(default {DEFAULT_BUSY:g}; 1: on every flush)")
    access = p.add_mutually_exclusive_group()
    access.add_argument("--token", default="auto",
                        help="ask every request for this token (default: none on a loopback --host, a random one, "
                             "printed in the address, on any other)")
    access.add_argument("--no-token", dest="token", action="store_const", const=None,
                        help="ask no token, even on a --host other machines can reach")
    p.add_argument("--certfile", metavar="PEM", help="serve HTTPS with this certificate (chain), PEM")
    p.add_argument("--keyfile", metavar="PEM", help="the certificate's private key, PEM (if not in --certfile)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    if not MIN_REFRESH <= args.refresh < math.inf:  # NaN too
        raise ConfigError(f"--refresh={args.refresh:g} is not allowed: "
                          f"--refresh must be a number of seconds >= {MIN_REFRESH:g}")
    serve_forever(args.run_dirs, args.host, args.port, args.refresh, args.busy, args.verbose, args.token,
                  args.certfile, args.keyfile)
    return 0


__all__ = ["start", "serve_forever", "Server", "Dashboard", "run_status", "find_runs"]
