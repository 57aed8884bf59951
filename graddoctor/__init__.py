"""graddoctor: find, explain and fix vanishing and exploding gradients in PyTorch training.

The verbs, one folder each, in the order data flows:
- core/: watch, the on-device gradient statistics;
- store/: the run store they are written to, and its reader (`open_run`);
- diagnosis/: diagnose (findings from a run) and check (a prediction from one batch);
- treat/: the cures as code (transforms, guard, rollback, init, surgery, regularization);
- report/, serve.py: the views; lab/: every phenomenon and cure, reproduced.
"""
import sys

from . import serve, treat
from ._errors import (
    ConfigError,
    CorruptStoreError,
    GradDoctorError,
    NoGradientsError,
    ResumeMismatchError,
    RunExistsError,
    RunLockedError,
    RunNotFoundError,
    UnsupportedModelError,
    WatchClosedError,
)
from .core._compose import watch
from .core._config import WatchConfig
from .core._native import status as native_status
from .core._stats import TensorStats, l2_norms, tensor_stats
from .core._watch import Watch
from .diagnosis import DiagnoseConfig, Finding, diagnose  # gd.diagnose is the function; the package is diagnosis
from .diagnosis._check import CheckReport, CheckThresholds, LayerProfile, check, format_check
from .doctor import doctor, format_prescription  # gd.doctor is the doctor (a callable); gd.doctor.lightning too
from .lab import run_lab
from .report import write_run_report
from .store._run import History, Run, open_run
from .treat import (
    Guard,
    agc,
    auto_clip,
    chain,
    clip_norm,
    clip_norm_per_tensor,
    clip_value,
    init,
    skip_nonfinite,
    surgery,
    zclip,
)

# `import graddoctor.init` / `graddoctor.surgery`, as before they moved into treat/
sys.modules[__name__ + ".init"], sys.modules[__name__ + ".surgery"] = init, surgery

__version__ = "0.1.0"

__all__ = [
    "watch", "Watch", "WatchConfig", "open_run", "Run", "History", "TensorStats", "tensor_stats", "l2_norms",
    "native_status",
    "check", "format_check", "CheckReport", "CheckThresholds", "LayerProfile",
    "GradDoctorError", "RunNotFoundError", "CorruptStoreError", "ConfigError", "NoGradientsError",
    "RunExistsError", "RunLockedError", "ResumeMismatchError", "UnsupportedModelError", "WatchClosedError",
    "diagnose", "Finding", "DiagnoseConfig",
    "treat", "init", "surgery", "chain", "clip_value", "clip_norm", "clip_norm_per_tensor", "auto_clip", "agc", "zclip",
    "skip_nonfinite", "Guard", "run_lab", "write_run_report", "serve", "doctor", "format_prescription",
]
