"""The doctor: try the cures diagnose ranks, measure them side by side, prescribe the one that works.

    rx = gd.doctor(build, batches, loss_fn, steps=200)   # build() -> (model, optimizer), fresh each call
    print(gd.format_prescription(rx))                     # batches() -> a fresh iterator of (x, y)
    rx.baseline, rx.best, rx.trials                       # Trials, best first
    rx = gd.doctor.lightning(module_factory, datamodule, steps=200)   # a LightningModule's training_step

It sits above diagnosis and treat (it uses watch, diagnose and the remedy catalogue); nothing below imports it.
`graddoctor doctor SCRIPT.py` runs it from the command line; `graddoctor report OUT` draws its prescription.
"""
from __future__ import annotations

import functools
from typing import Any

from ._doctor import doctor as _doctor
from ._lightning import lightning_doctor
from ._prescription import Prescription, format_prescription, load_prescription
from ._trial import Trial


class Doctor:
    """`gd.doctor(build, batches, loss_fn, ...)`; `gd.doctor.lightning(module_factory, datamodule, ...)`."""

    lightning = staticmethod(lightning_doctor)

    def __init__(self) -> None:
        functools.update_wrapper(self, _doctor)  # help(gd.doctor) and its signature are the function's

    def __call__(self, *args: Any, **kwargs: Any) -> Prescription:
        return _doctor(*args, **kwargs)


doctor = Doctor()

__all__ = ["doctor", "Doctor", "Prescription", "Trial", "format_prescription", "load_prescription"]
