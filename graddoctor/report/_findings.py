"""Findings for a run from `graddoctor.diagnose`, as plain dicts for the report and JSON.

The report works without the diagnose module (it then says so); with it,
every run gets its findings beside the plots.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Optional


def _diagnose_module():
    # importlib, not `from .. import diagnose`: the package re-exports the *function* under that name.
    return importlib.import_module("graddoctor.diagnose")


def diagnose_available() -> bool:
    try:
        return hasattr(_diagnose_module(), "diagnose")
    except ImportError:
        return False


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


def findings_for(run_dir: Path | str) -> Optional[list[dict]]:
    """diagnose(run_dir) as a list of dicts; None when graddoctor.diagnose is not installed."""
    if not diagnose_available():
        return None
    out = _diagnose_module().diagnose(str(run_dir))
    items = getattr(out, "findings", out)
    return [to_dict(f) for f in items]
