"""HTTPS for the dashboard (`--certfile`/`--keyfile`): the context, and the handshake in each connection's thread."""
from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Optional

from .._errors import ConfigError
from ._page import LOCKED

_PLAIN_HTTP_REFUSAL = ("HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n"
                       f"X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nContent-Security-Policy: {LOCKED}"
                       "\r\n\r\nthis dashboard speaks HTTPS only: open the https:// address graddoctor serve printed\n"
                       ).encode()

# What a client can do wrong at the connection level (plain HTTP to HTTPS, a failed handshake, going
# away): the server drops it with one line under --verbose, no traceback, and keeps serving.
CLIENT_ERRORS = (ssl.SSLError, ConnectionError, socket.timeout)


def tls_context(certfile: Optional[str | Path], keyfile: Optional[str | Path]) -> Optional[ssl.SSLContext]:
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


def wrap(connection: socket.socket, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    """The accepted `connection` after the TLS handshake; a plain-HTTP client is told what to open instead.

    Called in the connection's own thread, not on accept, so one slow client cannot hold up the others.
    Raises ConnectionAbortedError (or an ssl.SSLError) for a client that does not speak TLS.
    """
    connection.settimeout(timeout)
    first = connection.recv(1, socket.MSG_PEEK)
    if not first:
        raise ConnectionAbortedError("closed before sending anything")
    if first != b"\x16":  # not a TLS handshake record: most likely plain HTTP
        connection.sendall(_PLAIN_HTTP_REFUSAL)
        raise ConnectionAbortedError("plain HTTP sent to the HTTPS dashboard")
    return context.wrap_socket(connection, server_side=True)
