"""graddoctor: find, explain and fix vanishing and exploding gradients in PyTorch training.

The verbs, one module each:
- watch (`_watch`): on-device gradient statistics, written to a run store (`_store`, read with `_run`);
- diagnose, treat, check, lab: built on what watch records.
"""
from ._config import WatchConfig
from ._errors import (ConfigError, CorruptStoreError, GradDoctorError, NoGradientsError, ResumeMismatchError,
                      RunExistsError, RunLockedError, RunNotFoundError, UnsupportedModelError, WatchClosedError)
from ._run import History, Run, open_run
from ._stats import TensorStats, l2_norms, tensor_stats
from ._native import status as native_status
from ._compose import watch
from ._watch import Watch
from ._check import CheckReport, CheckThresholds, LayerProfile, check, format_check
from .diagnose import DiagnoseConfig, Finding, diagnose  # note: gd.diagnose is the function, not the subpackage
from . import init, serve, surgery, treat
from .lab import run_lab
from .report import write_run_report
from .treat import (Guard, agc, auto_clip, chain, clip_norm, clip_norm_per_tensor, clip_value, skip_nonfinite,
                    zclip)

__version__ = "0.1.0"

__all__ = [
    "watch", "Watch", "WatchConfig", "open_run", "Run", "History", "TensorStats", "tensor_stats", "l2_norms",
    "native_status",
    "check", "format_check", "CheckReport", "CheckThresholds", "LayerProfile",
    "GradDoctorError", "RunNotFoundError", "CorruptStoreError", "ConfigError", "NoGradientsError",
    "RunExistsError", "RunLockedError", "ResumeMismatchError", "UnsupportedModelError", "WatchClosedError",
    "diagnose", "Finding", "DiagnoseConfig",
    "treat", "init", "surgery", "chain", "clip_value", "clip_norm", "clip_norm_per_tensor", "auto_clip", "agc", "zclip",
    "skip_nonfinite", "Guard", "run_lab", "write_run_report", "serve",
]
