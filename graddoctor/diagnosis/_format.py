"""Text and JSON forms of a diagnosis. format_* return strings; the CLI prints them."""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from ..store import _nonfinite_json
from ._findings import SEVERITIES, Finding

SCHEMA = "graddoctor.diagnosis/1"


def findings_document(findings: Iterable[Finding], run_dir: Optional[str] = None, steps: Optional[int] = None,
                      interventions: Optional[list] = None) -> dict:
    """The `--json` document: schema id, run, per-severity counts, the findings and the treat
    interventions recorded in the run (README documents it)."""
    findings = list(findings)
    return {"schema": SCHEMA, "run_dir": run_dir, "steps": steps,
            "counts": {s: sum(f.severity == s for f in findings) for s in SEVERITIES},
            "findings": [f.to_dict() for f in findings], "interventions": list(interventions or [])}


def format_json(findings: Iterable[Finding], run_dir: Optional[str] = None, steps: Optional[int] = None,
                interventions: Optional[list] = None) -> str:
    """The document as JSON text; NaN/Inf are written as "NaN"/"Infinity" strings (never bare tokens)."""
    return _nonfinite_json.dumps(findings_document(findings, run_dir, steps, interventions), indent=2)


def _value(v: Any, limit: int = 4) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else f"{v:.3g}")
    if isinstance(v, dict):
        items = [f"{k}: {_value(x)}" for k, x in list(v.items())[:limit]]
        return "{" + ", ".join(items) + (f", ... ({len(v)} in all)" if len(v) > limit else "") + "}"
    if isinstance(v, (list, tuple)):
        items = [_value(x) for x in list(v)[:limit * 2]]
        return "[" + ", ".join(items) + (f", ... ({len(v)} in all)" if len(v) > limit * 2 else "") + "]"
    return str(v)


def format_finding(f: Finding, index: int) -> list[str]:
    steps = f"step {f.first_step}" if f.first_step == f.last_step else f"steps {f.first_step}-{f.last_step}"
    lines = [f"{index}. {f.code}  ({steps}, cause: {f.cause})", f"   {f.message}"]
    if f.layers:
        shown = ", ".join(f.layers[:6]) + (f", ... ({len(f.layers)} in all)" if len(f.layers) > 6 else "")
        lines.append(f"   layers: {shown}")
    reasoning = f.evidence.get("reasoning")
    if reasoning:
        lines.append(f"   why: {reasoning}")
    numbers = [f"{k}={_value(v)}" for k, v in f.evidence.items() if k != "reasoning" and v is not None]
    if numbers:
        lines.append("   evidence: " + "; ".join(numbers))
    if f.remedies:
        lines.append("   remedies (best first):")
        for i, r in enumerate(f.remedies, 1):
            lines.append(f"     {i}. {r.id}: {r.why}")
            lines.extend(f"          {s}" for s in r.snippet.splitlines())
    return lines


def format_findings(findings: Iterable[Finding], run_dir: Optional[str] = None, steps: Optional[int] = None,
                    interventions: Optional[list] = None) -> str:
    """Readable report grouped by severity (critical first), with layer names and the numbers, then
    the treat interventions recorded in the run (statistics are recorded before any guard acts)."""
    findings = list(findings)
    head = f"diagnosis of {run_dir}" if run_dir else "diagnosis"
    if steps is not None:
        head += f" ({steps} steps)"
    tail = _format_interventions(interventions)
    counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    if not findings:
        return head + "\nno findings: no sign of vanishing or exploding gradients in the recorded statistics." + tail
    lines = [head, ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if counts[s])]
    n = 0
    for sev in reversed(SEVERITIES):
        group = [f for f in findings if f.severity == sev]
        if not group:
            continue
        lines += ["", sev.upper()]
        for f in group:
            n += 1
            lines += format_finding(f, n)
    return "\n".join(lines) + tail


def _format_interventions(interventions: Optional[list]) -> str:
    if not interventions:
        return ""
    lines = [f"  {i['what']}: {i['steps']} step(s), {i['first_step']}-{i['last_step']}; {i['detail']}"
             for i in interventions]
    head = "interventions recorded by graddoctor.treat (findings describe the gradients before them):"
    return "\n\n" + head + "\n" + "\n".join(lines)
