"""graddoctor lab: reproduce each vanishing/exploding-gradient phenomenon and each cure, with plots.

    graddoctor lab --preset quick --out runs/lab      # or: make lab

Every experiment trains real, tiny models on the CPU, records them with
`graddoctor.watch`, measures the effect the seeds or the paper describe, and
says whether it reproduced (computed from the numbers). The lab writes
`report.html` (self-contained) and `results.json` in the output directory.
"""
from __future__ import annotations

# Importing an experiment module registers it; the order in the report is each one's `order`.
from . import (  # noqa: F401
    activations,
    batchnorm,
    chain,
    clipping,
    doctor,
    inits,
    pretraining,
    recurrent,
    regularization,
    residual,
    surface,
    transformer,
)
from ._runner import LabResult, format_summary_table, run_lab, select
from ._types import PRESETS, REGISTRY, Context, Experiment, Result

__all__ = ["run_lab", "LabResult", "format_summary_table", "select", "PRESETS", "REGISTRY", "Context",
           "Experiment", "Result"]
