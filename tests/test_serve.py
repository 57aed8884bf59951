"""`graddoctor serve`: the live dashboard, against real runs written while it serves.

The status is checked against the store read independently (`open_run`), the findings on the page
against `graddoctor.diagnosis` run on the same store, and the page itself in a real headless
Chromium (Debian's, driven by Playwright) while a training writes new flushes under it.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _browser import ARGS, CHROMIUM, needs_chromium
from torch import nn

import graddoctor as gd
from graddoctor import ConfigError, GradDoctorError, open_run
from graddoctor.serve import Dashboard, run_status
from graddoctor.store._nonfinite_json import decode_nonfinite

ROOT = Path(__file__).resolve().parents[1]


def _net(depth: int = 8, width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Sigmoid()]  # deep sigmoid: gradients vanish toward the input
    return nn.Sequential(*layers, nn.Linear(width, 4))


class Trainer:
    """A small real training, stepped in pieces so the dashboard can be checked between them."""

    def __init__(self, run_dir: Path, flush_every: int = 10, seed: int = 0):
        torch.manual_seed(seed)
        self.model = _net()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.x, self.y = torch.randn(64, 32), torch.randint(0, 4, (64,))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # live findings are warnings too; the test reads them from the store
            self.watch = gd.watch(self.model, self.opt, run_dir, flush_every=flush_every)

    def steps(self, n: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(n):
                loss = nn.functional.cross_entropy(self.model(self.x), self.y)
                self.opt.zero_grad()
                loss.backward()
                self.watch.step(loss)
                self.opt.step()

    def close(self) -> None:
        self.watch.close()


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def _strict_json(text: str):
    def refuse(name):  # standard JSON only: NaN must arrive spelled, never as a bare NaN token
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def test_status_follows_a_run_from_waiting_to_finished(tmp_path):
    run_dir = tmp_path / "a"
    assert run_status(run_dir)["state"] == "waiting"
    t = Trainer(run_dir, flush_every=10)
    t.steps(25)  # two flushes (steps 0-9, 10-19); 20-24 still buffered
    s = run_status(run_dir)
    with open_run(run_dir) as run:
        assert s["steps"] == run.num_steps == 20
    assert s["state"] == "live" and s["updated"] is not None
    before = s["version"]
    t.close()
    s = run_status(run_dir)
    with open_run(run_dir) as run:
        assert s["steps"] == run.num_steps == 25
    assert s["state"] == "closed" and s["version"] != before
    with open_run(run_dir) as run:
        live = [e["data"]["severity"] for e in run.events("finding")]
    assert s["findings"] == len(live) and s["critical"] == live.count("critical")


def test_status_carries_the_last_loss_and_norm_nan_included(tmp_path):
    """The last loss and global norm, read back from the store; a NaN stays NaN through the JSON."""
    t = Trainer(tmp_path / "a", flush_every=5)
    t.steps(5)
    s = run_status(tmp_path / "a")
    with open_run(tmp_path / "a") as run:
        assert s["loss"] == float(run.loss()[1][-1]) and s["grad_norm"] == float(run.global_norm()[1][-1])
    t.x[0, 0] = float("nan")  # a poisoned batch: the loss and every gradient norm go NaN
    t.steps(5)
    with gd.serve.start([tmp_path / "a"], port=0) as dash:
        body = _get(dash.url + "status")[2]
    assert '"loss": "NaN"' in body and '"grad_norm": "NaN"' in body  # spelled: standard JSON has no NaN
    run_json = _strict_json(body)["runs"][0]
    assert math.isnan(decode_nonfinite(run_json["loss"])) and math.isnan(decode_nonfinite(run_json["grad_norm"]))
    with open_run(tmp_path / "a") as run:
        assert math.isnan(run.loss()[1][-1])  # the oracle: what the store holds
    assert "loss NaN, grad norm NaN" in _strict_json(body)["text"]
    t.close()


def test_a_run_recorded_again_is_live_again(tmp_path):
    run_dir = tmp_path / "a"
    t = Trainer(run_dir, flush_every=5)
    t.steps(5)
    t.close()
    assert run_status(run_dir)["state"] == "closed"
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = gd.watch(model, None, run_dir, overwrite=True)
    try:
        assert run_status(run_dir)["state"] == "live"
    finally:
        w.close()


@pytest.mark.slow
def test_server_routes_and_cached_content(tmp_path):
    t = Trainer(tmp_path / "a", flush_every=10)
    t.steps(20)
    with gd.serve.start([tmp_path / "a", tmp_path / "later"], port=0, refresh=1) as dash:
        code, kind, body = _get(dash.url + "status")
        assert code == 200 and kind == "application/json"
        status = _strict_json(body)
        assert [r["state"] for r in status["runs"]] == ["live", "waiting"]
        assert status["runs"][0]["steps"] == 20
        code, kind, page = _get(dash.url)
        assert code == 200 and kind.startswith("text/html")
        assert "figure class=\"plot\"" in page and "waiting for graddoctor.watch" in page
        assert "http://" not in page.replace(dash.url, "") and "https://" not in page  # nothing from the network
        first, version = dash.dashboard.content()
        assert version == status["version"]
        drawn = dash.dashboard._drawn[tmp_path / "a"]
        assert dash.dashboard.content()[0] == first  # the same store: served from the cache, not drawn again
        assert dash.dashboard._drawn[tmp_path / "a"] is drawn
        t.steps(10)  # a new flush: the section is drawn again (busy=1: as soon as the store changed)
        dash.dashboard.busy = 1.0
        again, newer = dash.dashboard.content()
        assert again != first and newer != version and newer == dash.dashboard.status()["version"]
        code, _, body = _get(dash.url + "nope")
        assert code == 404 and "/status" in body
    t.close()


@pytest.mark.slow
def test_a_folder_of_runs_shows_every_run_below_it_and_new_ones(tmp_path):
    runs = tmp_path / "runs"
    for name in ("exp1/relu", "exp1/sigmoid"):
        t = Trainer(runs / name, flush_every=5)
        t.steps(5)
        t.close()
    (runs / "notes").mkdir()  # a folder without runs is not a run
    dash = Dashboard([runs], busy=1.0)
    dash.first_draw_seconds = 600.0  # draw every run in one answer (the run-by-run fill is tested below)
    assert [Path(r["run"]) for r in dash.status()["runs"]] == [runs / "exp1/relu", runs / "exp1/sigmoid"]
    later = Trainer(runs / "exp2", flush_every=5)  # a run started while the dashboard serves
    later.steps(5)
    status = dash.status()
    assert [Path(r["run"]) for r in status["runs"]] == [runs / "exp1/relu", runs / "exp1/sigmoid", runs / "exp2"]
    assert [r["state"] for r in status["runs"]] == ["closed", "closed", "live"]
    html, version = dash.content()
    assert html.count("<section>") == 3 and version == status["version"]
    later.close()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [r["state"] for r in Dashboard([empty]).status()["runs"]] == ["waiting"]


@pytest.mark.slow
def test_a_folder_of_many_runs_fills_the_page_run_by_run(tmp_path):
    for name in ("a", "b", "c", "d"):
        t = Trainer(tmp_path / name, flush_every=5)
        t.steps(5)
        t.close()
    dash = Dashboard([tmp_path])
    dash.first_draw_seconds = 0.0  # each answer draws one run not drawn before
    status = dash.status()
    found = sum(r["findings"] for r in status["runs"])
    assert status["text"].startswith(f"4 runs: 4 finished; {found} live finding")  # more than 3 runs: one summary
    versions = [dash.content()[1] for _ in range(4)]
    assert [v.split("|").count("pending") for v in versions] == [3, 2, 1, 0]
    assert versions[-1] == status["version"]


@pytest.mark.slow
def test_redrawing_waits_in_proportion_to_its_cost(tmp_path):
    """With busy=b, after a drawing of d seconds no changed run is drawn again for d(1/b - 1)."""
    t = Trainer(tmp_path / "a", flush_every=10)
    t.steps(10)
    dash = Dashboard([tmp_path / "a"], busy=1e-6)  # the wait is ~1e6 drawings: never, within this test
    html, version = dash.content()
    t.steps(10)
    current = dash.status()["version"]
    assert current != version
    assert dash.content() == (html, version)  # stale on purpose, and says so: the page will ask again
    dash.busy = 1.0
    assert dash.content()[1] == current
    t.close()


@pytest.mark.slow
def test_sections_draw_in_parallel_and_each_change_once(tmp_path, monkeypatch):
    """No dashboard lock around drawing: sections drawn in four threads at once are byte for byte the ones
    drawn one at a time (the report renders one figure at a time, as mathtext's parser is process-wide);
    answers asked at once draw each run once."""
    from graddoctor.report import _pages
    for name in ("a", "b"):
        t = Trainer(tmp_path / name, flush_every=5, seed=len(name))
        t.steps(5)
        t.close()
    runs = [tmp_path / "a", tmp_path / "b"]
    serial = {run: _pages.run_section(run) for run in runs}
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(_pages.run_section, runs * 2)) == [serial[run] for run in runs * 2]
    drawn, draw = [], _pages.run_section
    monkeypatch.setattr(_pages, "run_section", lambda run: drawn.append(run) or draw(run))
    dash = Dashboard(runs, busy=1.0)
    dash.first_draw_seconds = 600.0  # every run in one answer
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: dash.content(), range(4)))
    assert sorted(drawn) == runs  # the other answers waited for the drawing and took it from the cache
    assert all(html == serial[runs[0]] + serial[runs[1]] for html, _ in answers)


def test_bad_options_are_refused_with_the_value(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="refresh=0"):
        Dashboard([tmp_path], refresh=0)
    with pytest.raises(ConfigError, match="refresh=nan"):
        Dashboard([tmp_path], refresh=float("nan"))
    with pytest.raises(ConfigError, match="busy=0"):
        Dashboard([tmp_path], busy=0)
    with pytest.raises(ConfigError, match="busy=1.5"):
        Dashboard([tmp_path], busy=1.5)
    with pytest.raises(ConfigError, match="is a file"):
        Dashboard([tmp_path / "file"])
    with pytest.raises(ConfigError, match="no run directory"):
        Dashboard([])
    with pytest.raises(ConfigError, match="port=70000"):
        gd.serve.start([tmp_path], port=70000)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(GradDoctorError, match=f"cannot listen on 127.0.0.1:{port}"):
            gd.serve.start([tmp_path], port=port)
    finally:
        busy.close()


def test_a_corrupt_store_is_shown_and_the_other_runs_still_served(tmp_path):
    t = Trainer(tmp_path / "good", flush_every=5)
    t.steps(5)
    bad = tmp_path / "bad"
    bad.mkdir()
    sqlite3.connect(bad / "graddoctor.sqlite").execute("CREATE TABLE other(x)").connection.close()
    with gd.serve.start([bad, tmp_path / "good"], port=0) as dash:
        status = _strict_json(_get(dash.url + "status")[2])
        assert status["runs"][0]["state"] == "error" and "missing tables" in status["runs"][0]["error"]
        assert status["runs"][1]["state"] == "live" and status["runs"][1]["steps"] == 5
        content = _get(dash.url + "content")[2]
        assert "cannot read this run" in content and "figure class=\"plot\"" in content
    t.close()


def _damaged_run(run_dir: Path, series: str, keep_bytes: int) -> None:
    """A finished 5-step run whose `series` blobs were cut to `keep_bytes` bytes (a disk fault, a stray write)."""
    t = Trainer(run_dir, flush_every=5)
    t.steps(5)
    t.close()
    con = sqlite3.connect(run_dir / "graddoctor.sqlite")
    with con:
        con.execute("UPDATE chunks SET data = substr(data, 1, ?) WHERE series = ?", (keep_bytes, series))
    con.close()


def test_a_run_that_cannot_be_drawn_is_shown_with_the_reason(tmp_path):
    """A store whose gradient-norm blobs were cut short: its status reads, its plots cannot be drawn."""
    _damaged_run(tmp_path / "a", "grad_norm", 7)
    dash = Dashboard([tmp_path / "a"])
    assert dash.status()["runs"][0]["state"] == "closed"
    html, version = dash.content()
    assert "cannot read this run: CorruptStoreError: series &#x27;grad_norm&#x27;" in html and version == "error", html


def test_a_damaged_loss_chunk_makes_the_status_say_so(tmp_path):
    _damaged_run(tmp_path / "a", "loss", 3)
    s = run_status(tmp_path / "a")
    assert s["state"] == "error" and "series 'loss'" in s["error"]


def _get_with(url: str, cookie: str = "") -> tuple[int, str, dict]:
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.mark.slow
def test_a_token_guards_every_route(tmp_path):
    t = Trainer(tmp_path / "a", flush_every=5)
    t.steps(5)
    t.close()
    with gd.serve.start([tmp_path / "a"], port=0, token="s3cret") as dash:
        assert dash.token == "s3cret" and dash.link == dash.url + "?token=s3cret"
        for path in ("", "status", "content", "?token=wrong", "status?token=s3cre", "?token=%C3%A9"):
            code, body, _ = _get_with(dash.url + path)
            assert code == 403 and "token" in body, path
        code, page, headers = _get_with(dash.link)
        assert code == 200 and "figure class=\"plot\"" in page
        name = f"graddoctor_token_{dash.port}"
        assert headers["Set-Cookie"] == f"{name}=s3cret; Path=/; HttpOnly; SameSite=Strict"
        code, body, _ = _get_with(dash.url + "status", cookie=f"{name}=s3cret")  # what the page's polls send
        assert code == 200 and _strict_json(body)["runs"][0]["steps"] == 5
        assert _get_with(dash.url + "content", cookie=f"{name}=s3cret")[0] == 200
        assert _get_with(dash.url + "status", cookie=f"{name}=wrong")[0] == 403
        assert _get_with(dash.url + "status", cookie="graddoctor_token_1=s3cret")[0] == 403  # another port's
        assert _get_with(dash.url + "status", cookie="\x7f;;=")[0] == 403  # a cookie that does not parse


def test_an_open_local_server_answers_localhost_names_only(tmp_path):
    # DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example
    with gd.serve.start([tmp_path], port=0) as dash:
        for host in (f"localhost:{dash.port}", f"127.0.0.1:{dash.port}", "[::1]", "127.1.2.3"):
            request = urllib.request.Request(dash.url + "status", headers={"Host": host})
            with urllib.request.urlopen(request, timeout=30) as r:
                assert r.status == 200, host
        for host in (f"evil.example:{dash.port}", "localhost.evil.example", "10.0.0.1", ""):
            request = urllib.request.Request(dash.url + "status", headers={"Host": host})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 403 and "localhost names only" in refused.value.read().decode(), host
    with gd.serve.start([tmp_path], port=0, token="t") as dash:  # the token guards it instead
        request = urllib.request.Request(dash.link, headers={"Host": "evil.example"})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200


def _raw(port: int, host: bytes | None, path: str = "/status", method: str = "GET") -> tuple[int, str, dict]:
    """One request with exactly this Host header (None: none at all), as http.client sends it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    finally:
        conn.close()


MALFORMED_HOSTS = [b"[::1", b"[", b"[::1]:notaport", b"[::1]x", b"[not-an-ip]:80", b"local host",
                   "caf\u00e9.example".encode(), "\u2603".encode(), b"localhost:80/x", b"a@localhost"]


def test_a_malformed_host_is_answered_400_and_the_server_serves_on(tmp_path, capfd):
    """A Host that is not `name[:port]` or `[IPv6][:port]` gets 400 naming it, with or without a token."""
    for token in (None, "t"):
        with gd.serve.start([tmp_path], port=0, token=token) as dash:
            for host in MALFORMED_HOSTS:
                code, body, headers = _raw(dash.port, host, "/status?token=t")
                assert code == 400 and headers["Content-Type"].startswith("text/plain"), (host, code, body)
                assert body.startswith("bad Host header ") and body.count("\n") == 1, body
                assert repr(host.decode("latin-1")) in body, (host, body)
            long = b"a" * 5000  # well-formed, refused; its echo is cut short
            code, body, _ = _raw(dash.port, long, "/status?token=t")
            assert code == (403 if token is None else 200), code
            assert token is not None or (body.startswith("this dashboard answers to localhost names only, "
                                                         "not Host: 'aaa") and len(body) < 400), body
            two = http.client.HTTPConnection("127.0.0.1", dash.port, timeout=30)  # two Host headers: 400
            two.putrequest("GET", "/status", skip_host=True)
            two.putheader("Host", "localhost")
            two.putheader("Host", "evil.example")
            two.endheaders()
            assert two.getresponse().status == 400
            two.close()
            assert _raw(dash.port, None, "/?token=t")[0] == (403 if token is None else 200)  # HTTP/1.0 style: no Host
            assert _raw(dash.port, b"", "/?token=t")[0] == (403 if token is None else 200)
            assert _raw(dash.port, b"localhost", "//[?token=t")[0] == 404  # a path that looks like a bad netloc
            assert _raw(dash.port, f"LOCALHOST:{dash.port}".encode(), "/status?token=t")[0] == 200
            assert _raw(dash.port, b"[::1]:", "/status?token=t")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err, err


PAGE_POLICY = ("default-src 'none'; script-src {script}; style-src {style}; img-src data:; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOCKED_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _assert_secured(headers: dict, policy: str, what: str) -> None:
    assert headers.get("X-Content-Type-Options") == "nosniff", what
    assert headers.get("X-Frame-Options") == "DENY", what
    assert headers.get("Content-Security-Policy") == policy, (what, headers.get("Content-Security-Policy"))


@pytest.mark.slow
def test_every_answer_carries_the_security_headers(tmp_path):
    """The page's policy allows exactly its own inline script and style (by hash), data: images and
    same-origin polls; every other answer, http.server's own errors included, allows nothing."""
    t = Trainer(tmp_path / "a", flush_every=5)
    t.steps(5)
    t.close()
    with gd.serve.start([tmp_path / "a"], port=0) as dash:
        code, page, headers = _raw(dash.port, b"localhost", "/")
        assert code == 200 and "figure class=\"plot\"" in page
        (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
        (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
        assert not re.search(r"<script|\son[a-z]+=|\sstyle=|javascript:", page.replace(f"<script>{script}", ""))
        page_policy = PAGE_POLICY.format(script=_sha256(script), style=_sha256(style))
        _assert_secured(headers, page_policy, "/")
        _assert_secured(_raw(dash.port, b"localhost", "/content")[2], page_policy, "/content")
        for path, host, expected in (("/status", b"localhost", 200), ("/nope", b"localhost", 404),
                                     ("/status", b"evil.example", 403), ("/status", b"[::1", 400)):
            code, _, headers = _raw(dash.port, host, path)
            assert code == expected, (path, host, code)
            _assert_secured(headers, LOCKED_POLICY, path)
        code, _, headers = _raw(dash.port, b"localhost", "/", method="POST")  # http.server's own answer
        assert code == 501
        _assert_secured(headers, LOCKED_POLICY, "POST")
        with socket.create_connection(("127.0.0.1", dash.port), timeout=30) as s:  # a request line that does not parse
            s.sendall(b"GET a b HTTP/1.0\r\n\r\n")
            answer = s.makefile("rb").read().decode("latin-1")
        assert answer.startswith("HTTP/1.0 400") and "X-Frame-Options: DENY\r\n" in answer, answer
    with gd.serve.start([tmp_path / "a"], port=0, refresh=2) as other:  # the script does not change with refresh
        assert _raw(other.port, b"localhost", "/")[2]["Content-Security-Policy"] == page_policy


def test_serve_options_that_cannot_work_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Each bad option: exit 2, one line naming the value and what is allowed, no traceback (never serves)."""
    from graddoctor.cli import main
    monkeypatch.setattr(gd.serve._server._DashboardHTTPServer, "serve_forever",  # a missing check fails, not hangs
                        lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "file").write_text("x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    run = str(tmp_path / "a")
    floor = "--refresh must be a number of seconds >= 0.5"
    cases = [([run, "--refresh", "0.1"], ["--refresh=0.1 ", floor]),
             ([run, "--refresh", "0.49"], ["0.49", floor]), ([run, "--refresh", "0"], ["--refresh=0 ", floor]),
             ([run, "--refresh", "nan"], ["nan", floor]), ([run, "--refresh", "inf"], ["inf", floor]),
             ([run, "--refresh=-inf"], ["-inf", floor]), ([run, "--refresh", "-1"], ["-1", floor]),
             ([run, "--port", "70000"], ["port=70000", "from 1 to 65535"]),
             ([run, "--port", "-1"], ["port=-1", "from 1 to 65535"]),
             ([run, "--port", str(taken.getsockname()[1])], [f"127.0.0.1:{taken.getsockname()[1]}", "--port"]),
             ([run, "--port", "0", "--host", "nonexistent.invalid"], ["nonexistent.invalid", "--host"]),
             ([run, "--port", "0", "--host", "192.0.2.1"], ["192.0.2.1", "--host"]),  # not this machine's
             ([run, "--port", "0", "--host", "::1"], ["::1", "--host", "IPv4"]),
             ([str(tmp_path / "file"), "--port", "0"], ["file' is a file", "run directories"]),
             ([run, "--busy", "2"], ["busy=2.0", "<= 1"]),
             ([run, "--token", "a b"], ["token='a b'", "letters, digits"])]
    try:
        for argv, words in cases:
            capsys.readouterr()
            assert main(["serve", *argv]) == 2, argv
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and err.startswith("graddoctor: error: "), (argv, err)
            assert all(w in err for w in words), (argv, err)
            if "--host" in words:
                assert "another --port" not in err, err  # the port is not what is wrong
    finally:
        taken.close()
    monkeypatch.undo()
    for argv in (["--refresh", "soon"], ["--port", "http"]):  # not a number at all: argparse's usage and error
        with pytest.raises(SystemExit) as exited:
            main(["serve", run, *argv])
        assert exited.value.code == 2 and repr(argv[1]) in capsys.readouterr().err


def test_a_run_directory_that_does_not_exist_is_waited_for(tmp_path):
    """Not an error: the page waits for watch to create it; a name that is not UTF-8 is shown, not a crash."""
    odd = tmp_path / os.fsdecode(b"run-\xff")  # a byte name from the shell, not UTF-8
    with gd.serve.start([tmp_path / "missing" / "deep", odd], port=0) as dash:
        status = _strict_json(_get(dash.url + "status")[2])
        assert [r["state"] for r in status["runs"]] == ["waiting", "waiting"], status
        code, _, page = _get(dash.url)
        assert code == 200 and "run-?" in page and "waiting for graddoctor.watch" in page
        assert _get(dash.url + "content")[0] == 200


@pytest.mark.slow
def test_a_token_is_asked_by_default_only_off_loopback(tmp_path):
    with gd.serve.start([tmp_path], port=0) as dash:
        assert dash.token is None and dash.link == dash.url
        assert _get_with(dash.url + "status")[0] == 200
    with gd.serve.start([tmp_path], host="0.0.0.0", port=0) as dash:  # reachable from other machines
        assert dash.token is not None and len(dash.token) >= 16 and dash.link.endswith(f"?token={dash.token}")
        local = f"http://127.0.0.1:{dash.port}/"
        assert _get_with(local + "status")[0] == 403
        assert _get_with(local + f"status?token={dash.token}")[0] == 200
    with gd.serve.start([tmp_path], host="0.0.0.0", port=0) as other:
        assert other.token != dash.token  # random each time
    with gd.serve.start([tmp_path], host="0.0.0.0", port=0, token=None) as dash:
        assert dash.token is None and _get_with(f"http://127.0.0.1:{dash.port}/status")[0] == 200
    for bad in ("", "a b", "x/y", 5):
        with pytest.raises(ConfigError, match=f"token={bad!r} is not allowed"):
            gd.serve.start([tmp_path], port=0, token=bad)


@pytest.mark.slow
def test_cli_prints_the_address_with_its_token(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for options, tokened in ((["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--no-token"], False),
                             (["--token", "mine"], True)):
        proc = subprocess.Popen([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path), "--port", "0",
                                 *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=ROOT)
        try:
            link = proc.stdout.readline().split()[2]
            assert ("?token=" in link) == tokened, (options, link)
            assert link.endswith("?token=mine") == (options[-1] == "mine")
            port = link.split(":")[2].split("/")[0]
            assert _get_with(f"http://127.0.0.1:{port}/status")[0] == (403 if tokened else 200)
            assert _get_with(link.replace("0.0.0.0", "127.0.0.1").replace("localhost", "127.0.0.1"))[0] == 200
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
    both = subprocess.run([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path), "--token", "a",
                           "--no-token"], capture_output=True, text=True, cwd=ROOT)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None and os.environ.get("CI") != "true",
                                   reason="the openssl command is not installed (apt-get install openssl)")


def _certificate(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A self-signed certificate for `name` and 127.0.0.1, and its key (PEM files made by openssl)."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run([OPENSSL or "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name},IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def _get_tls(url: str, cafile: Path, cookie: str = "") -> tuple[int, str, dict]:
    context = ssl.create_default_context(cafile=str(cafile))
    request = urllib.request.Request(url, headers={"Cookie": cookie} if cookie else {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


@pytest.mark.slow
@needs_openssl
def test_https_serves_the_runs_and_keeps_the_token_off_the_wire(tmp_path):
    t = Trainer(tmp_path / "a", flush_every=5)
    t.steps(5)
    t.close()
    cert, key = _certificate(tmp_path)
    with gd.serve.start([tmp_path / "a"], port=0, certfile=cert, keyfile=key, token="s3cret") as dash:
        assert dash.tls and dash.url == f"https://localhost:{dash.port}/" and dash.link == dash.url + "?token=s3cret"
        code, page, headers = _get_tls(dash.link, cert)
        assert code == 200 and "figure class=\"plot\"" in page
        name = f"graddoctor_token_{dash.port}"
        assert headers["Set-Cookie"] == f"{name}=s3cret; Path=/; HttpOnly; SameSite=Strict; Secure"
        code, body, _ = _get_tls(dash.url + "status", cert, cookie=f"{name}=s3cret")
        assert code == 200 and decode_nonfinite(_strict_json(body))["runs"][0] == run_status(tmp_path / "a")
        assert _get_tls(dash.url + "status", cert)[0] == 403  # TLS does not replace the token
        # A plain-HTTP client is told where to go, and the server goes on serving.
        code, body, headers = _get_with(f"http://127.0.0.1:{dash.port}/status?token=s3cret")
        assert code == 400 and "speaks HTTPS only" in body and "s3cret" not in body
        _assert_secured(headers, LOCKED_POLICY, "plain HTTP to HTTPS")
        _assert_secured(_get_tls(dash.url + "status", cert)[2], LOCKED_POLICY, "403 over TLS")
        # A client that does not trust the certificate fails its handshake; one that connects and
        # says nothing does not hold up the next client.
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(dash.url + "status", timeout=30)
        with socket.create_connection(("127.0.0.1", dash.port)):
            assert _get_tls(dash.link, cert)[0] == 200
    # The key may sit in the certificate's own file.
    both = tmp_path / "both.pem"
    both.write_text(cert.read_text() + key.read_text())
    with gd.serve.start([tmp_path / "a"], port=0, certfile=both) as dash:
        assert dash.token is None and _get_tls(dash.url + "status", cert)[0] == 200


@pytest.mark.slow
@needs_openssl
def test_bad_tls_files_are_refused_by_name(tmp_path):
    cert, key = _certificate(tmp_path)
    _, other_key = _certificate(tmp_path, "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.pem"  # a passphrase must be refused, not asked for on a terminal
    subprocess.run([OPENSSL or "openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:pw", "-out",
                    str(encrypted)], check=True, capture_output=True)
    cases = [(dict(certfile=tmp_path / "missing.pem"), "certfile=.*missing.pem' is not a file"),
             (dict(certfile=cert, keyfile=tmp_path / "nokey.pem"), "keyfile=.*nokey.pem' is not a file"),
             (dict(keyfile=key), "keyfile=.*was given without certfile"),
             (dict(certfile=junk, keyfile=key), "certfile=.*junk.pem' with keyfile=.*cannot be used for TLS"),
             (dict(certfile=cert), "certfile=.*cert.pem' \\(no keyfile: the key must be in it\\) cannot be used"),
             (dict(certfile=cert, keyfile=other_key), "cannot be used for TLS.*the PEM private key that belongs to it"),
             (dict(certfile=cert, keyfile=encrypted), "private key in .*encrypted.pem' is encrypted")]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message):
            gd.serve.start([tmp_path], port=0, **options)
    cli = subprocess.run([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path), "--port", "0",
                          "--keyfile", str(key)], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 2 and "was given without certfile" in cli.stderr


@pytest.mark.slow
@needs_openssl
def test_cli_serves_https(tmp_path):
    cert, key = _certificate(tmp_path)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path), "--port", "0",
                             "--certfile", str(cert), "--keyfile", str(key)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        link = proc.stdout.readline().split()[2]
        assert link.startswith("https://localhost:"), link
        assert _get_tls(link + "status", cert)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


@pytest.mark.slow
def test_cli_serves_until_interrupted(tmp_path):
    t = Trainer(tmp_path / "a", flush_every=5)
    t.steps(5)
    t.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path / "a"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("graddoctor serve: http://localhost:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        status = _strict_json(_get(url + "status")[2])
        assert status["runs"][0]["state"] == "closed" and status["runs"][0]["steps"] == 5
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    bad = subprocess.run([sys.executable, "-m", "graddoctor.cli", "serve", str(tmp_path / "a"), "--refresh", "-1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr == ("graddoctor: error: --refresh=-1 is not allowed: "
                                              "--refresh must be a number of seconds >= 0.5\n"), bad.stderr


pytestmark_browser = needs_chromium


def _csp_violation(text: str) -> bool:
    """Chromium's console line for a Content-Security-Policy violation ("Refused to ..." in older ones), any level."""
    return "Content Security Policy" in text or text.startswith("Refused to")


@pytest.mark.slow
@pytestmark_browser
def test_dashboard_updates_in_chromium_while_the_run_trains(tmp_path, artifacts):
    """Open the page before the run exists; train; the page fills in and follows without a reload."""
    from playwright.sync_api import sync_playwright
    run_dir = tmp_path / "deep-sigmoid"
    errors, foreign, violations = [], [], []
    with gd.serve.start([run_dir], port=0, refresh=0.2, busy=1.0) as dash, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("console", lambda m: violations.append(m.text) if _csp_violation(m.text) else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: foreign.append(r.url) if not r.url.startswith((dash.url, "data:")) else None)
        page.goto(dash.url, wait_until="load")
        assert "waiting for graddoctor.watch" in page.inner_text("#content")

        t = Trainer(run_dir, flush_every=20)
        t.steps(40)
        page.wait_for_function("() => document.getElementById('status').textContent.includes('40 steps')",
                               timeout=60_000)
        page.wait_for_function("() => document.querySelectorAll('figure.plot img').length >= 3", timeout=60_000)
        page.evaluate("() => { window.__same_document = true; }")  # survives only if the page is not reloaded
        t.steps(40)
        t.close()
        page.wait_for_function("() => document.getElementById('status').textContent.includes('80 steps, finished')",
                               timeout=60_000)
        page.wait_for_function("() => document.body.dataset.version.endsWith(':True')", timeout=60_000)
        # the content shown is the store's final state, drawn after the last flush
        assert page.evaluate("() => window.__same_document === true")
        plots = page.evaluate("""() => [...document.querySelectorAll('figure.plot img')].map(
            i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""")
        assert len(plots) >= 3 and all(p["complete"] and p["w"] > 50 and p["h"] > 50 for p in plots), plots
        codes = page.evaluate(
            "() => [...document.querySelectorAll('.findings td:nth-child(2) code')].map(c => c.textContent)")
        bar = page.evaluate(
            "() => [document.getElementById('bar').className, document.getElementById('status').textContent]")
        page.screenshot(path=str(artifacts / "serve-dashboard.png"))
        clean = (list(errors), list(violations))
        # The control: the policy is enforced, and a violation does reach the console listener.
        with page.expect_console_message(lambda m: _csp_violation(m.text), timeout=10_000):
            page.evaluate("""() => { const s = document.createElement('script');
                s.textContent = 'window.__injected = 1'; document.body.append(s); }""")
        injected = page.evaluate("() => window.__injected")
        browser.close()
    assert clean == ([], []), clean
    assert injected is None and any("inline script" in v for v in violations), violations  # Chromium's wording varies
    expected = [f.code for f in gd.diagnose(str(run_dir))]
    assert expected, "premise: the deep sigmoid run has findings"
    assert codes == expected
    with open_run(run_dir) as run:  # the status bar counts the findings live diagnosis wrote into the store
        live = [e["data"]["severity"] for e in run.events("finding")]
    assert live, "premise: live diagnosis wrote findings"
    critical = live.count("critical")
    assert f"{len(live)} live finding" in bar[1] and (f"({critical} critical)" in bar[1]) == (critical > 0)
    assert bar[0] == ("critical" if critical else "")
    assert foreign == []


@pytest.mark.slow
@pytestmark_browser
def test_a_tokened_dashboard_works_in_chromium_and_refuses_without_the_token(tmp_path):
    """The page opened with ?token= keeps polling through its cookie; a browser without it is refused."""
    from playwright.sync_api import sync_playwright
    run_dir = tmp_path / "a"
    errors = []
    with gd.serve.start([run_dir], port=0, refresh=0.2, busy=1.0, token="t0k") as dash, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" or _csp_violation(m.text) else None)
        page.goto(dash.link, wait_until="load")
        t = Trainer(run_dir, flush_every=5)
        t.steps(10)
        t.close()
        # the polls carry no ?token=: only the cookie lets them through
        page.wait_for_function("() => document.getElementById('status').textContent.includes('10 steps, finished')",
                               timeout=60_000)
        stranger = browser.new_context().new_page()  # no cookie
        response = stranger.goto(dash.url)
        assert response.status == 403 and "token" in stranger.inner_text("body")
        browser.close()
    assert errors == []


@pytest.mark.slow
@pytestmark_browser
@needs_openssl
def test_an_https_dashboard_follows_a_run_in_chromium(tmp_path):
    """Over HTTPS the page's polls ride on its Secure cookie, and nothing is fetched over plain HTTP."""
    from playwright.sync_api import sync_playwright
    run_dir = tmp_path / "a"
    cert, key = _certificate(tmp_path)
    errors, plain = [], []
    with gd.serve.start([run_dir], host="0.0.0.0", port=0, refresh=0.2, busy=1.0, certfile=cert,
                        keyfile=key) as dash, sync_playwright() as p:
        link = dash.link.replace("0.0.0.0", "localhost")
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(ignore_https_errors=True)  # the test's own self-signed certificate
        page = context.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" or _csp_violation(m.text) else None)
        page.on("request", lambda r: plain.append(r.url) if r.url.startswith("http:") else None)
        page.goto(link, wait_until="load")
        t = Trainer(run_dir, flush_every=5)
        t.steps(10)
        t.close()
        page.wait_for_function("() => document.getElementById('status').textContent.includes('10 steps, finished')",
                               timeout=60_000)
        cookies = {c["name"]: c for c in context.cookies()}
        browser.close()
    cookie = cookies[f"graddoctor_token_{dash.port}"]
    assert cookie["value"] == dash.token and cookie["secure"] and cookie["httpOnly"]
    assert errors == [] and plain == []


@pytest.mark.slow
@pytestmark_browser
def test_a_folder_of_runs_fills_in_chromium_run_by_run(tmp_path):
    """Each answer draws one run (first_draw_seconds=0); the page asks again at once until all are drawn."""
    from playwright.sync_api import sync_playwright
    for name in ("a", "b", "c"):
        t = Trainer(tmp_path / "runs" / name, flush_every=5)
        t.steps(5)
        t.close()
    errors = []
    with gd.serve.start([tmp_path / "runs"], port=0, refresh=30) as dash, sync_playwright() as p:
        dash.dashboard.first_draw_seconds = 0.0
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" or _csp_violation(m.text) else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash.url, wait_until="load")
        first = page.evaluate("() => document.body.dataset.version")
        assert first.split("|").count("pending") == 2  # the page itself drew one run
        # refresh=30 s: filling in within the wait below is the page asking again at once, not polling
        page.wait_for_function("() => !document.body.dataset.version.includes('pending')", timeout=20_000)
        final = dash.dashboard.status()["version"]
        assert page.evaluate("() => document.body.dataset.version") == final
        assert page.evaluate("() => document.querySelectorAll('section figure.plot').length") >= 9
        browser.close()
    assert errors == []
