"""The reports in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

Checks: no console errors, no failed requests, every plot container holds a
decoded image of non-zero size, and a full-page screenshot in the session's artifacts folder.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from _browser import ARGS, CHROMIUM, needs_chromium

pytestmark = [needs_chromium, pytest.mark.slow]  # a real browser


def _inspect(html_file: Path, screenshot: Path) -> dict:
    from playwright.sync_api import sync_playwright
    errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(html_file.resolve().as_uri(), wait_until="load")
        plots = page.evaluate("""() => [...document.querySelectorAll('figure.plot')].map(f => {
            const img = f.querySelector('img'); const r = f.getBoundingClientRect();
            return {w: r.width, h: r.height, img: !!img, complete: img ? img.complete : false,
                    nw: img ? img.naturalWidth : 0, nh: img ? img.naturalHeight : 0,
                    iw: img ? img.getBoundingClientRect().width : 0, title: f.innerText.slice(0, 60)};
        })""")
        sections = page.evaluate("() => document.querySelectorAll('section').length")
        rows = page.evaluate("() => { const t = document.querySelector('table');"
                             " return t ? t.querySelectorAll('tbody tr').length : 0; }")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    return dict(errors=errors, plots=plots, sections=sections, rows=rows,
                remote=[u for u in requests if not u.startswith(("file:", "data:"))])


def _assert_plots_rendered(info: dict) -> None:
    assert info["errors"] == []
    assert info["remote"] == []  # works offline: nothing fetched from the network
    assert info["plots"], "no plot containers"
    for p in info["plots"]:
        assert p["img"] and p["complete"], p
        assert p["nw"] > 50 and p["nh"] > 50, p  # decoded image, not a broken icon
        assert p["w"] > 50 and p["h"] > 50 and p["iw"] > 50, p


def test_lab_report_renders_in_chromium(quick_lab_run, quick_lab_results, artifacts):
    out, _ = quick_lab_run
    results = quick_lab_results
    info = _inspect(out / "report.html", artifacts / "lab-report.png")
    _assert_plots_rendered(info)
    assert info["sections"] == len(results)
    assert info["rows"] == len(results)  # the summary table: one row per experiment
    assert len(info["plots"]) >= 2 * len(results)
    assert (artifacts / "lab-report.png").stat().st_size > 10_000


def test_run_report_of_a_diverged_run_renders(tmp_path, quick_lab_run, artifacts):
    """`graddoctor report` on a run whose loss went NaN (the 'large' init): NaN/Inf are drawn, not fatal."""
    from graddoctor import open_run
    from graddoctor.cli import main
    out, _ = quick_lab_run
    run_dir = out / "runs" / "init" / "large"
    with open_run(run_dir) as run:
        import numpy as np
        assert not np.isfinite(run.loss()[1]).all()  # the premise: this run diverged
    html = tmp_path / "large.html"
    assert main(["report", str(run_dir), str(out / "runs" / "init" / "he"), "-o", str(html)]) == 0
    info = _inspect(html, artifacts / "run-report.png")
    _assert_plots_rendered(info)
    assert len(info["plots"]) >= 6  # heat map, profiles, loss (and activations) per run
