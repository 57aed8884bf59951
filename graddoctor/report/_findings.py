"""Findings for a run from `graddoctor.diagnosis`, as plain dicts for the report and JSON."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def to_dict(obj: Any) -> Any:
    """A finding (dataclass, object with to_dict/as_dict, or dict) as JSON-able dicts and lists."""
    for attr in ("to_dict", "as_dict"):
        if hasattr(obj, attr) and callable(getattr(obj, attr)):
            return to_dict(getattr(obj, attr)())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def findings_for(run_dir: Path | str) -> list[dict]:
    """`graddoctor.diagnose(run_dir)` as a list of dicts."""
    from ..diagnosis import diagnose
    return [to_dict(f) for f in diagnose(str(run_dir))]
