"""`/views`: the numbers behind each run's plots, as JSON, for scripts and tests that read the dashboard.

The rows are the report's (`graddoctor.report._rows`): one per block for a large model, one per layer
for a small one, with the labels the plots print. Read on request from the store, as a report is
(a long run's series take a moment to decode), never on the page's polls.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..store._run import open_run


def run_views(run_dir: str | Path) -> dict[str, Any]:
    """One run's views: the heat map's rows, the profiles' values, the activation panel's entries.

    Keys: run; rows ("block" or "layer"); names, labels and tensors per row (input side first);
    profiles: [{step, grad_norm: one value per row}] at the steps the profile plot shows (float64;
    NaN: no gradient that step); activations: None, or {grouped (beyond 64 modules: per block, its largest
    fraction), names, labels, relu_family, steps (first and last sampled), fraction: [[per module or
    block] at each of those steps]}; activations_off: why watch
    recorded no activation statistics (None when it did, absent for stores written before it said).
    """
    from ..report._rows import act_rows, grad_rows
    from ..report._views import chosen_steps
    with open_run(run_dir) as run:
        rows, acts, meta = grad_rows(run), act_rows(run), run.meta
    out: dict[str, Any] = {
        "run": str(run_dir), "rows": "block" if rows.by_block else "layer", "names": rows.names,
        "labels": rows.labels, "tensors": rows.tensors,
        "profiles": [{"step": int(rows.steps[i]), "grad_norm": _floats(rows.values[i])}
                     for i in chosen_steps(rows.steps)],
        "activations": None if acts is None else {
            "grouped": acts.grouped, "names": acts.names, "labels": acts.labels, "relu_family": acts.relu_family,
            "steps": acts.steps, "fraction": [_floats(v) for v in acts.values]}}
    if "activations_off" in meta:
        out["activations_off"] = meta["activations_off"]
    return out


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) for v in values]
