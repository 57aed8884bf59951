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
read-only reader never blocks the training (README, "What graddoctor guarantees"); and re-drawing
the report's plots only when a flush has landed costs the server about as much as one
`graddoctor report` per flush.

Routes (GET): `/` the page; `/status` JSON (per run: whether it exists, last step, last loss and
global gradient norm, whether watch has closed it, when the store was last written, live findings;
non-finite floats spelled "NaN"/"Infinity" as in the rest of graddoctor's JSON); `/views` JSON, the
numbers behind each run's plots (the heat map's rows, per block for a large model, with their labels;
the profiles' values; the activation panel's entries; why activation statistics are off), read on
request, never polled; `/content` the runs' sections as an HTML fragment. Nothing is fetched from the
network: the page's plots are inline PNG, its script and style are inline (the page is package data,
`page.html`).
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

Modules: `_status` (a run's status from its store), `_views` (the `/views` JSON), `_dashboard` (what is
served, drawn when it changed), `_page` (the page and its Content-Security-Policy), `_auth` (token and Host checks),
`_tls` (HTTPS), `_server` (the HTTP server, `start`, `serve_forever`), `_cli` (the command).
"""
from __future__ import annotations

from ._cli import MIN_REFRESH, register
from ._dashboard import DEFAULT_BUSY, DEFAULT_REFRESH, FIRST_DRAW_SECONDS, Dashboard
from ._server import DEFAULT_PORT, Server, serve_forever, start
from ._status import FIND_DEPTH, find_runs, run_status

__all__ = ["start", "serve_forever", "Server", "Dashboard", "run_status", "find_runs", "register",
           "DEFAULT_PORT", "DEFAULT_REFRESH", "DEFAULT_BUSY", "MIN_REFRESH", "FIRST_DRAW_SECONDS", "FIND_DEPTH"]
