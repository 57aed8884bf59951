"""The HTTP server: routes, security headers, access checks, and `start` / `serve_forever`."""
from __future__ import annotations

import errno
import json
import ssl
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional, Sequence

from .._errors import ConfigError, GradDoctorError
from ..store._nonfinite_json import encode_nonfinite
from . import _auth, _tls
from ._dashboard import DEFAULT_BUSY, DEFAULT_REFRESH, Dashboard
from ._page import LOCKED, page_policy

DEFAULT_PORT = 8765


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the subclass made by `_bind`
    token: Optional[str] = None  # asked of every request when set (see `start`)
    loopback_only = False  # on a loopback address without a token: answer localhost Host headers only
    tls_context: Optional[ssl.SSLContext] = None  # set: HTTPS only, and the token's cookie is marked Secure
    verbose = False
    # Seconds a connection may sit idle (or mid-handshake) before its thread gives it up.
    timeout = 60
    csp = LOCKED  # the Content-Security-Policy of the answer being sent (`_send` sets the page's)

    def setup(self) -> None:
        if self.tls_context is not None:
            self.request = _tls.wrap(self.request, self.tls_context, self.timeout)
        super().setup()

    def finish(self) -> None:
        super().finish()
        if isinstance(self.request, ssl.SSLSocket):  # the server closes only the socket it accepted
            self.request.close()

    @property
    def tls(self) -> bool:
        return self.tls_context is not None

    @property
    def _port(self) -> int:
        return int(self.server.server_address[1])  # type: ignore[index]  # a TCP server's: (host, port)

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        path = self.path.split("?", 1)[0]
        try:
            hosts = self.headers.get_all("Host") or [""]
            host = _auth.host_name(hosts[0]) if len(hosts) == 1 else None
            refused = self._refusal(host, hosts[0]) if host is not None else None
            if host is None:
                self._send(HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", f"bad Host header "
                           f"{_auth.shown(', '.join(hosts))}: expected a name or an address, optionally with :port\n")
            elif refused is not None:
                self._send(HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8", refused)
            elif path == "/":
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", self.dashboard.page(), self._cookie())
            elif path == "/status":
                body = json.dumps(encode_nonfinite(self.dashboard.status()), allow_nan=False)
                self._send(HTTPStatus.OK, "application/json", body)
            elif path == "/views":
                body = json.dumps(encode_nonfinite(self.dashboard.views()), allow_nan=False)
                self._send(HTTPStatus.OK, "application/json", body)
            elif path == "/content":
                html, version = self.dashboard.content()
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", html, {"X-Graddoctor-Version": version})
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8",
                           f"no page {_auth.shown(path)}: this server has /, /status, /views and /content\n")
        except (BrokenPipeError, ConnectionResetError):  # the browser went away mid-answer
            pass

    def _refusal(self, host: str, host_header: str) -> Optional[str]:
        """Why this request may not read the dashboard (the 403's text), or None (see `_auth.refusal`)."""
        cookies = self.headers.get("Cookie", "")
        given = _auth.given_token(self.path, cookies, self._port) if self.token is not None else None
        return _auth.refusal(host, host_header, self.loopback_only, self.token, given,
                             "https" if self.tls else "http", self._port)

    def _cookie(self) -> Optional[dict[str, str]]:
        """The page's Set-Cookie header, which keeps the token for its polls; None without a token."""
        if self.token is None:
            return None
        name, secure = _auth.cookie_name(self._port), "; Secure" if self.tls else ""
        return {"Set-Cookie": f"{name}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"}

    def _send(self, code: HTTPStatus, kind: str, body: str, headers: Optional[dict[str, str]] = None) -> None:
        data = body.encode("utf-8", "replace")  # a run directory's name may not be UTF-8 (bytes from a shell)
        self.csp = page_policy() if kind.startswith("text/html") else LOCKED
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


class _DashboardHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that speaks plain HTTP to HTTPS, fails the handshake, or goes away is its own
        # problem: one line with --verbose, no traceback, and the server keeps serving.
        error = sys.exc_info()[1]
        if isinstance(error, _tls.CLIENT_ERRORS):
            if self.RequestHandlerClass.verbose:  # type: ignore[attr-defined]
                print(f"graddoctor serve: dropped {client_address[0]}: {error}", file=sys.stderr)
            return
        super().handle_error(request, client_address)


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


def _bind(run_dirs: Sequence[str | Path], host: str, port: int, refresh: float, busy: float, verbose: bool,
          token: Optional[str], certfile: Optional[str | Path] = None,
          keyfile: Optional[str | Path] = None) -> tuple[ThreadingHTTPServer, Dashboard]:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"port={port!r} is not allowed: use an integer from 1 to 65535, or 0 for any free port")
    dashboard = Dashboard(run_dirs, refresh, busy)
    token = _auth.make_token(token, host)
    context = _tls.tls_context(certfile, keyfile)
    handler = type("DashboardHandler", (_Handler,), {"dashboard": dashboard, "verbose": verbose, "token": token,
                                                    "loopback_only": token is None and _auth.is_loopback(host),
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
