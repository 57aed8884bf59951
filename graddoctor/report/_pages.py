"""The two pages: the lab report (summary table, then one section per experiment) and a per-run report."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

from . import _html as H
from ._findings import findings_for
from ._views import run_figures


def lab_page(results: Sequence[Any], info: dict[str, Any]) -> str:
    """HTML of the lab report.

    Args:
      results: `graddoctor.lab` Results (name, title, claim, measured, reproduced, figures, findings, ...).
      info: preset, seed, seconds, torch version and such, shown in the header.
    """
    n_ok = sum(bool(r.reproduced) for r in results)
    rows = [[f"<a href=\"#{H.esc(r.name)}\">{H.esc(r.title)}</a>", H.esc(r.claim), H.esc(r.measured),
             f"<span class=\"{'yes' if r.reproduced else 'no'}\">{'yes' if r.reproduced else 'no'}</span>"]
            for r in results]
    header = (f"<h1>graddoctor lab: vanishing and exploding gradients, reproduced</h1>"
              f"<p class=\"muted\">{n_ok} of {len(results)} experiments reproduced · preset "
              f"<b>{H.esc(info.get('preset'))}</b> · seed {H.esc(info.get('seed'))} · "
              f"{H.fmt(info.get('seconds', float('nan')))} s · torch "
              f"{H.esc(info.get('torch'))} · {H.esc(info.get('created', ''))}. Every number below was measured in this "
              f"run from real trainings recorded with <code>graddoctor.watch</code>; 'reproduced' is computed from "
              f"those numbers by each experiment's stated rule.</p>")
    summary = "<h2>Summary</h2>" + H.table(["experiment", "what the seeds / paper say", "what we measured",
                                              "reproduced"], rows, raw_cols=(0, 1, 2, 3))
    return H.page("graddoctor lab report", header + summary + "".join(_section(r) for r in results))


def _section(r: Any) -> str:
    verdict = "reproduced" if r.reproduced else "NOT reproduced"
    parts = [f"<section id=\"{H.esc(r.name)}\"><h2>{H.esc(r.title)}</h2>",
             f"<div class=\"claim\"><b>Seeds / paper:</b> {H.esc(r.claim)}"
             f"{' <span class=muted>(' + H.esc(r.reference) + ')</span>' if getattr(r, 'reference', '') else ''}</div>",
             f"<div class=\"measured{'' if r.reproduced else ' fail'}\"><b>Measured ({verdict}):</b> "
             f"{H.esc(r.measured)}</div>"]
    if getattr(r, "rule", ""):
        parts.append(f"<p class=\"muted\"><b>Rule for 'reproduced':</b> {H.esc(r.rule)}</p>")
    if r.notes:
        parts.append(f"<p class=\"muted\"><b>Set-up:</b> {H.esc(r.notes)}</p>")
    parts.append(f"<p class=\"muted\">{len(r.runs)} run(s) recorded with watch under "
                 f"<code>runs/{H.esc(r.name)}/</code> in {H.fmt(getattr(r, 'seconds', float('nan')))} s.</p>")
    parts.append(H.figures(r.figures))
    parts.append(H.findings_overview(r.findings or {}))
    parts.append("</section>")
    return "".join(parts)


def run_page(run_dirs: Sequence[Path | str], title: Optional[str] = None) -> str:
    """HTML of the per-run report: for each run, heat map, profiles, loss, activations and findings."""
    body = [f"<h1>{H.esc(title or 'graddoctor run report')}</h1>",
            f"<p class=\"muted\">{len(run_dirs)} run(s) · generated "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
    body += [run_section(rd) for rd in run_dirs]
    return H.page(title or "graddoctor run report", "".join(body))


def run_section(run_dir: Path | str) -> str:
    """One run's section of the report (also the live dashboard's, see graddoctor.serve)."""
    figs = run_figures(run_dir)
    body = [f"<section><h2>{H.esc(run_dir)}</h2>" + (H.figures(figs) if figs else
            "<p class=\"muted\">this run recorded no training step yet: nothing to plot.</p>")]
    body.append(H.findings(findings_for(run_dir), str(run_dir)))
    body.append("</section>")
    return "".join(body)
