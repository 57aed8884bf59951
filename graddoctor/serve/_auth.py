"""Who may read the dashboard: the token (as Jupyter's) and the Host check against DNS rebinding."""
from __future__ import annotations

import hmac
import ipaddress
import re
import secrets
from http.cookies import CookieError, SimpleCookie
from typing import Optional
from urllib.parse import parse_qs

from .._errors import ConfigError


def host_name(header: str) -> Optional[str]:
    """The name or address in a Host header (an RFC 3986 reg-name or IPv4, or an [IPv6], then :port), in lower
    case and IPv6 without brackets; None if it is malformed."""
    m = re.fullmatch(r"(?:\[([0-9a-f:.]+)\]|([a-z0-9._~!$&'()*+,;=%-]*))(?::[0-9]*)?", header.strip().lower())
    try:
        return None if m is None else m[2] if m[1] is None else str(ipaddress.IPv6Address(m[1]))
    except ValueError:  # brackets around something that is not an IPv6 address
        return None


def shown(text: str, limit: int = 80) -> str:
    """`text` quoted for a message, cut short past `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def make_token(token: Optional[str], host: str) -> Optional[str]:
    """The token the server asks for: `token` itself, or for "auto" none on loopback and a random one elsewhere."""
    if token == "auto":
        return None if is_loopback(host) else secrets.token_urlsafe(16)
    if token is not None and not (isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9._~-]+", token)):
        raise ConfigError(f"token={token!r} is not allowed: use letters, digits and . _ ~ - (at least one), "
                          f"'auto' (none on a loopback host, a random one elsewhere) or None (no token)")
    return token


def cookie_name(port: int) -> str:
    # Cookies are not kept per port: a name per port keeps two dashboards on one host apart.
    return f"graddoctor_token_{port}"


def given_token(path: str, cookie_header: str, port: int) -> Optional[str]:
    """The token in the query (`?token=`), else in the page's cookie; None if neither."""
    query = parse_qs(path.partition("?")[2]).get("token")
    if query:
        return query[0]
    try:
        morsel = SimpleCookie(cookie_header).get(cookie_name(port))
    except CookieError:
        return None
    return morsel.value if morsel is not None else None


def refusal(host: str, host_header: str, loopback_only: bool, token: Optional[str], given: Optional[str],
            scheme: str, port: int) -> Optional[str]:
    """Why a request to `host` (its Host header's name) may not read the dashboard (the 403's text), or None.

    Args:
      host_header: the Host header as sent, for the message.
      loopback_only: the server answers localhost names only (a loopback server without a token).
      token, given: the token the server asks for (None: none), and the one the request carries.
      scheme, port: the server's, for the address the message tells to open.
    """
    # A web page elsewhere can point a name it controls at 127.0.0.1 (DNS rebinding) and read
    # an open local server through the visitor's browser; its requests carry that name as Host.
    if loopback_only and not is_loopback(host):
        return (f"this dashboard answers to localhost names only, not Host: {shown(host_header)} "
                f"(a page elsewhere may be trying to read it); open it as {scheme}://localhost:{port}/\n")
    if token is not None and (given is None or not hmac.compare_digest(given.encode(), token.encode())):
        return ("this dashboard asks for its token: open the address graddoctor serve printed "
                "(it ends in ?token=...)\n")
    return None
