"""diagnose: turn a recorded run into findings with evidence, a cause and ranked remedies.

    findings = gd.diagnose("runs/exp1")
    for f in findings:
        print(f.severity, f.code, f.layers, f.cause, [r.id for r in f.remedies])

Rules (one per finding code) are pure functions over host arrays (`RunData`); thresholds live
in `DiagnoseConfig`; remedies come from `CATALOGUE`, keyed by the ids `graddoctor.treat` uses.
"""
from ._config import DiagnoseConfig
from ._data import RunData
from ._diagnose import RULES, diagnose, diagnose_data
from ._findings import CAUSES, CODES, SEVERITIES, Finding, Remedy
from ._format import findings_document, format_findings
from ._remedies import CATALOGUE, rank_remedies, remedy

__all__ = ["diagnose", "diagnose_data", "DiagnoseConfig", "RunData", "Finding", "Remedy", "RULES", "CODES",
           "SEVERITIES", "CAUSES", "CATALOGUE", "rank_remedies", "remedy", "format_findings", "findings_document"]
