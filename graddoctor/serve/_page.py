"""The dashboard's page (package data `page.html`: markup, style and script) and the Content-Security-Policies.

`page.html` holds `{{name}}` fields. The report's CSS is filled in once, when the file is first
read; the others (title, status, content, ...) on every answer, outside the style and the script.
So the page's one style and one script are the same on every answer, and its policy allows
exactly them, by the sha256 of the text served.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

_FIELD = re.compile(r"\{\{(\w+)\}\}")

# Content-Security-Policy: every answer but the page (and its /content) allows nothing at all.
_FRAMING = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
LOCKED = "default-src 'none'; " + _FRAMING


def _fill(template: str, fields: dict[str, str]) -> str:
    """`template` with each `{{name}}` in `fields` replaced, in one pass (a value is never read as a field)."""
    return _FIELD.sub(lambda m: fields.get(m[1], m[0]), template)


@functools.lru_cache(maxsize=None)
def _shell() -> str:
    """page.html with the report's CSS filled in: what every answer starts from."""
    from ..report import _html as H
    text = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    return _fill(text, {"report_css": H.CSS})


def render(**fields: str) -> str:
    """The page with its fields filled in (values already escaped where they need to be)."""
    return _fill(_shell(), fields)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.lru_cache(maxsize=None)
def page_policy() -> str:
    """The page's policy: its one script and style (by sha256; no other inline code), data: images, polls home."""
    (script,) = re.findall(r"<script>(.*?)</script>", _shell(), re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", _shell(), re.S)
    return (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; img-src data:; "
            f"connect-src 'self'; {_FRAMING}")
