"""HTML reports: self-contained pages (no network, no script), plots drawn as matplotlib figures (no pyplot).

    from graddoctor.report import write_run_report
    write_run_report(["runs/exp1"], "exp1.html")

`graddoctor report RUN_DIR -o FILE` does the same from the command line; the
lab writes its own report with `write_lab_report`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .._errors import GradDoctorError
from ._figure import Figure
from ._findings import findings_for


def write_run_report(run_dirs: Sequence[str | Path], out_file: str | Path, title: Optional[str] = None) -> Path:
    """Render the per-run views (gradient-flow heat map, layer profiles, loss, activations, findings) of runs.

    Args:
      run_dirs: run directories recorded with `graddoctor.watch`; or one output directory of `gd.doctor`
        (it holds prescription.json): then the page is the prescription, its loss curves and heat maps.
      out_file: the HTML file to write (its folder is created).
    Returns:
      The path written.
    Raises:
      RunNotFoundError / CorruptStoreError for a directory that holds no readable run;
      GradDoctorError naming `out_file` when it cannot be written.
    """
    from ..store._run import open_run
    from ._pages import run_page
    if len(run_dirs) == 1 and (Path(run_dirs[0]) / "prescription.json").is_file():  # a `gd.doctor` output dir
        from ..doctor._html import prescription_page
        return _write(prescription_page(run_dirs[0], title), _writable(out_file))
    for rd in run_dirs:  # fail early, with the library's error naming the path
        open_run(rd).close()
    out = _writable(out_file)  # and before drawing for seconds
    return _write(run_page(list(run_dirs), title), out)


def write_lab_report(results: Sequence[Any], info: dict[str, Any], out_file: str | Path) -> Path:
    """Render the lab's report (summary table first, then one section per experiment)."""
    from ._pages import lab_page
    return _write(lab_page(results, info), _writable(out_file))


def _writable(out_file: str | Path) -> Path:
    """`out_file` as a Path once its folder exists (created if missing); else a GradDoctorError naming it."""
    out = Path(out_file)
    folder = out.parent
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise GradDoctorError(f"cannot write the report to {str(out)!r}: {str(folder)!r} is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GradDoctorError(f"cannot write the report to {str(out)!r}: its folder cannot be created "
                              f"({e.strerror or e})") from e
    return out


def _write(text: str, out: Path) -> Path:
    # A run directory whose name is not UTF-8 reaches the page as lone surrogates: written as \udcff.
    try:
        out.write_text(text, encoding="utf-8", errors="backslashreplace")
    except OSError as e:
        raise GradDoctorError(f"cannot write the report to {str(out)!r}: {e.strerror or e}") from e
    return out


__all__ = ["write_run_report", "write_lab_report", "findings_for", "Figure"]
