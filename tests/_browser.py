"""Headless Chromium for the report and dashboard tests (Debian's /usr/bin/chromium driven by Playwright).

Shared here so that no test module imports another.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Skipped only on a developer machine without Chromium; under CI (.ci/run installs it) a missing
# browser must fail, not silently skip. Browser tests are slow too (`make test-fast` leaves them out):
# `@needs_chromium` and `@pytest.mark.slow` on a test, or `pytestmark = [needs_chromium, pytest.mark.slow]`.
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists() and os.environ.get("CI") != "true",
                                    reason="Debian chromium is not installed (apt-get install chromium)")
