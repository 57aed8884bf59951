"""HTML assembly: one self-contained page (inline CSS, images as data URIs, no script, no network).

Text from runs (layer names, finding messages) is escaped; numbers are
formatted so NaN and Inf read as "NaN" / "Inf" instead of breaking anything.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Sequence

from ._figure import Figure

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 4px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #ddd;padding:5px 7px;text-align:left;vertical-align:top} th{background:#f0f0f3}
.yes{color:#0a7d2c;font-weight:600} .no{color:#b3261e;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure.plot{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px;max-width:100%}
figure.plot img{display:block;max-width:100%;height:auto}
figcaption{font-size:12px;color:#555;max-width:760px;margin-top:4px}
.claim{background:#fff;border-left:4px solid #8a8fff;padding:6px 10px;margin:6px 0}
.measured{background:#fff;border-left:4px solid #4caf50;padding:6px 10px;margin:6px 0}
.measured.fail{border-left-color:#e53935}
.findings{font-size:12.5px} .sev-critical{color:#b3261e;font-weight:600} .sev-warning{color:#a15c00;font-weight:600}
.sev-info{color:#555} code{background:#f0f0f3;padding:0 3px;border-radius:3px} .muted{color:#666;font-size:12.5px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number for people: 3 significant digits, NaN/Inf spelled out; other values as text."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Inf" if v > 0 else "-Inf"
        return f"{v:.3g}"
    return str(value)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def figures(figs: Iterable[Figure]) -> str:
    parts = []
    for f in figs:
        cap = f"<figcaption><b>{esc(f.title)}</b>{'. ' + esc(f.caption) if f.caption else ''}</figcaption>"
        parts.append(f"<figure class=\"plot\"><img src=\"{f.data}\" alt=\"{esc(f.title)}\">{cap}</figure>")
    return "<div class=\"plots\">" + "".join(parts) + "</div>"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], raw_cols: Sequence[int] = ()) -> str:
    """An HTML table; cells are escaped except the column indices in `raw_cols` (already HTML)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_cols else esc(c)}</td>" for i, c in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def findings(items: Sequence[dict], run: str) -> str:
    """One run's diagnose findings as a compact table (or a line saying there are none)."""
    if not items:
        return f"<p class=\"muted\">diagnose on <code>{esc(run)}</code>: no findings.</p>"
    rows = []
    for f in items:
        sev = str(f.get("severity", ""))
        steps = f"{fmt(f.get('first_step'))}–{fmt(f.get('last_step'))}"
        all_layers = f.get("layers") or []
        layers = ", ".join(str(x) for x in all_layers[:4]) + (" …" if len(all_layers) > 4 else "")
        remedies = ", ".join(_remedy_id(r) for r in (f.get("remedies") or [])[:4])
        rows.append([f"<span class=\"sev-{esc(sev)}\">{esc(sev)}</span>", f"<code>{esc(f.get('code', ''))}</code>",
                     esc(steps), esc(layers), esc(f.get("cause", "")), esc(remedies), esc(f.get("message", ""))])
    return (f"<h3>diagnose: <code>{esc(run)}</code></h3><div class=\"findings\">" +
            table(["severity", "code", "steps", "layers", "cause", "remedies", "message"], rows,
                  raw_cols=range(7)) + "</div>")


def _remedy_id(r: Any) -> str:
    if isinstance(r, dict):
        return str(r.get("id") or r.get("remedy") or r.get("name") or "")
    return str(getattr(r, "id", r))


def findings_overview(by_run: dict[str, Sequence[dict]]) -> str:
    """One table for an experiment: each run, its findings (code and severity), causes and top remedies."""
    if not by_run:
        return ""
    rows, clean = [], [run for run, items in by_run.items() if not items]
    for run, items in by_run.items():
        if not items:
            continue
        codes = ", ".join(f"<span class=\"sev-{esc(f.get('severity', ''))}\">{esc(f.get('code', ''))}</span>"
                          for f in items) or "<span class=\"muted\">none</span>"
        causes = ", ".join(dict.fromkeys(str(f.get("cause", "")) for f in items))
        remedies = ", ".join(list(dict.fromkeys(_remedy_id(r) for f in items for r in (f.get("remedies") or [])))[:4])
        message = esc(items[0].get("message", "")) if items else ""
        rows.append([f"<code>{esc(run)}</code>", codes, esc(causes), esc(remedies), message])
    head = "<h3>diagnose on every run</h3>"
    tab = (table(["run", "findings (red: critical, orange: warning)", "cause", "top remedies", "first finding"],
                 rows, raw_cols=range(5)) if rows else "")
    none = (f"<p class=\"muted\">no findings: {', '.join(f'<code>{esc(r)}</code>' for r in clean)}</p>"
            if clean else "")
    return head + "<div class=\"findings\">" + tab + none + "</div>"
