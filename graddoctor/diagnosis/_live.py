"""Live diagnosis: after each flush, run the rules on the run's recent history and report new findings.

`watch` attaches a `LiveDiagnosis` as a flush listener (WatchConfig.live_diagnosis, on by default).
It receives the host arrays the flush just wrote (and reads the store only once, at the first flush,
for the run's metadata), so it adds no host sync and no read-back: the flush already was the sync
point. The rules see a window of recent steps plus where the run started (its first step and its
start loss level, carried in the window's `meta`), so a window's verdict on the loss (converged, or
an explosion in the first steps) is the one the final diagnose reaches on the whole run: on the same
data they agree, and a run whose loss fell far below its start is not "not decreasing" in either.
Each new finding is reported once: a `FindingWarning` through `warnings`,
a `logging` warning on the "graddoctor" logger (when logging is configured), the optional `on_finding`
callback, and an event of kind "finding" in the run store (its data is `Finding.to_dict()`).
"""
from __future__ import annotations

import logging
import warnings
from types import FrameType
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from ..store._run import Run
from ..store._series import ACT_FIELDS, ATTN_FIELDS, BY_NAME, LOGITS_FIELDS, TIME_FIELDS
from ._config import DiagnoseConfig
from ._data import RunData, align_loss, initial_level
from ._diagnose import diagnose_data
from ._findings import Finding
from ._rules_loss import RUN_FIRST_STEP, RUN_START_LEVEL

if TYPE_CHECKING:
    from ..core._watch import Watch

log = logging.getLogger("graddoctor")

# Codes that describe events (a spike, a bad batch, a big step) rather than a state of the run:
# a later episode, well past the last one reported, is reported again.
EPISODIC = {"loss_spike", "input_outlier", "large_weight_update"}


class FindingWarning(UserWarning):
    """A diagnosis finding raised while training (see `graddoctor.watch(on_finding=...)`)."""


class LiveDiagnosis:
    """Flush listener: keeps the recent history on the host and reports each new finding once.

    Args:
      run_dir: the run directory the watch writes.
      on_finding: optional callback `fn(finding)` called once per new finding.
      config: thresholds (default `DiagnoseConfig()`).
      window: steps of history the rules see at each flush (older steps are dropped, so the
        cost per flush stays bounded on long runs).
    """

    def __init__(self, run_dir, on_finding: Optional[Callable[[Finding], None]] = None,
                 config: Optional[DiagnoseConfig] = None, window: int = 2000):
        self.run_dir = run_dir
        self.on_finding = on_finding
        self.config = config or DiagnoseConfig()
        self.config.validate()  # a bad threshold is refused when watching starts, not at the first flush
        self.window = window
        self.reported: dict[str, Finding] = {}
        self.findings: list[Finding] = []  # every finding reported so far, in order
        self._series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._template: Optional[RunData] = None
        self._start: dict[str, float] = {}  # where the run started (RUN_FIRST_STEP, RUN_START_LEVEL)
        self.failed = False

    def __call__(self, watch: "Watch", first: int, last: int, chunks: list) -> None:
        if self.failed:
            return
        try:
            self._take_chunks(chunks, last)
            new = self.new_findings(diagnose_data(self._data(), self.config))
        except Exception:  # a diagnosis bug must never stop a training run
            self.failed = True
            log.exception("graddoctor: live diagnosis failed and is turned off for this run")
            return
        for f in new:
            self._report(watch, f)

    def new_findings(self, findings: list[Finding]) -> list[Finding]:
        """The findings not reported before (by code; again when more severe than the one reported, e.g.
        a real NaN after a note on a GradScaler's overflows; episodic codes again after a quiet stretch)."""
        out = []
        for f in findings:
            old = self.reported.get(f.code)
            if (old is None or f.rank > old.rank
                    or (f.code in EPISODIC and f.last_step > old.last_step + self.config.baseline_window)):
                out.append(f)
                self.reported[f.code] = f
        return out

    # ----------------------------------------------------------------- reading
    def _take_chunks(self, chunks: list, last: int) -> None:
        """Add a flush's host arrays to the window; the first flush also reads the run's metadata."""
        if self._template is None:  # first flush: metadata, and everything stored so far (this flush included)
            with Run(self.run_dir) as run:
                self._template = RunData.from_run(run)
            self._series = {k: (st[st > last - self.window], v[st > last - self.window])
                            for k, (st, v) in _series_of(self._template).items()}
            return
        for series, steps, data in chunks:
            if series in BY_NAME:
                self._append(series, steps, data, last)

    def _append(self, series: str, steps: np.ndarray, data: np.ndarray, last: int) -> None:
        old = self._series.get(series)
        if old is not None and len(old[0]):
            steps = np.concatenate([old[0], steps])
            data = np.concatenate([old[1], data.astype(old[1].dtype, copy=False)])
        keep = steps > last - self.window
        self._series[series] = (steps[keep], data[keep])

    def _data(self) -> RunData:
        t = self._template
        assert t is not None, "the first flush (_take_chunks) sets the template"
        s = self._series
        P, M = len(t.tensors), len(t.act_modules)

        def get(name):  # (steps, data [n, width]) of a series in the window; widths and dtypes from SERIES
            series = BY_NAME[name]
            width, dtype = series.width(P, M), np.dtype(series.dtype)
            steps, data = s.get(name, (np.zeros(0, np.int64), np.zeros((0, width), dtype)))
            return steps.astype(np.int64), data.reshape(len(steps), width).astype(dtype, copy=False)

        steps, gnorm = get("grad_total_norm")
        loss, given = align_loss(steps, *get("loss"))
        _, gn = get("grad_norm")
        _, nf = get("grad_nonfinite")
        ss, wn = get("weight_norm")
        us, un = get("update_norm")
        a_s, act = get("act")
        i_s, inp = get("input")
        amp_s, amp = get("amp")
        # Series whose width comes from the model (its metadata), not from SERIES: attention modules, the
        # LM head's log Z, recurrent layers' gradient through time. A width that does not match reads as none.
        def sized(name, width):
            steps, data = s.get(name, (np.zeros(0, np.int64), np.zeros((0, width), np.float32)))
            if data.size != len(steps) * width:
                return np.zeros(0, np.int64), np.zeros((0, width), np.float32)
            return steps.astype(np.int64), data.reshape(len(steps), width).astype(np.float32, copy=False)

        K = len(t.attn_modules)
        at_s, attn = sized("attn", K * len(ATTN_FIELDS))
        z_s, logz = sized("logits", len(LOGITS_FIELDS))
        ti_s, time_grad = sized("time_grad", len(TIME_FIELDS))
        T = min(len(steps), len(gn), len(nf))  # series of one flush are written together
        self._note_start(steps[:T], loss[:T], given[:T])
        return RunData(steps=steps[:T], loss=loss[:T], loss_given=given[:T], global_norm=gnorm[:T, 0], grad_norm=gn[:T],
                       grad_nonfinite=nf[:T], sample_steps=ss, weight_norm=wn, update_steps=us, update_norm=un,
                       tensors=t.tensors, tensor_module=t.tensor_module, tensor_shape=t.tensor_shape,
                       modules=t.modules, act_steps=a_s, act=act.reshape(len(a_s), M, len(ACT_FIELDS)),
                       act_modules=t.act_modules,
                       act_kinds=t.act_kinds, input_steps=i_s, inputs=inp, meta=dict(t.meta, **self._start),
                       amp_steps=amp_s, amp=amp, structure=t.structure,
                       attn_steps=at_s, attn=attn.reshape(len(at_s), K, len(ATTN_FIELDS)), attn_modules=t.attn_modules,
                       logz_steps=z_s, logz=logz, time_steps=ti_s, time_grad=time_grad, time_modules=t.time_modules,
                       zero_init_rms=self.config.zero_init_rms)

    def _note_start(self, steps: np.ndarray, loss: np.ndarray, given: np.ndarray) -> None:
        """Keep the run's first step and, once its first 10 finite losses are in, their median: the start level
        the final diagnose reads from the run's own first steps (`_rules_loss.start_loss_level`)."""
        if RUN_FIRST_STEP not in self._start and len(steps):
            self._start[RUN_FIRST_STEP] = int(steps[0])
        if RUN_START_LEVEL in self._start or not len(steps) or int(steps[0]) != self._start.get(RUN_FIRST_STEP):
            return
        finite = loss[given][np.isfinite(loss[given])]
        if len(finite) >= 10:
            self._start[RUN_START_LEVEL] = initial_level(finite)

    # ----------------------------------------------------------------- reporting
    def _report(self, watch: "Watch", f: Finding) -> None:
        self.findings.append(f)
        text = (f"graddoctor: {f.severity} {f.code} at steps {f.first_step}-{f.last_step} "
                f"(cause: {f.cause}): {f.message}")
        if f.remedies:
            text += f" Try: {', '.join(r.id for r in f.remedies[:3])}."
        if log.hasHandlers():  # without handlers, logging's last resort would print the warning a second time
            log.warning(text)
        warnings.warn(text, FindingWarning, stacklevel=_user_stacklevel())
        watch.write_event_now(f.last_step, "finding", f.to_dict())  # now: this flush may be the last one
        if self.on_finding is not None:
            self.on_finding(f)


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside graddoctor, so the warning names the user's line
    (the `w.step(loss)` or `w.close()` whose flush found it)."""
    import os
    import sys
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _series_of(d: RunData) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The per-series arrays of a RunData, keyed by store series name."""
    M = len(d.act_modules)
    return {"loss": (d.steps[d.given], d.loss[d.given].reshape(-1, 1)),
            "grad_total_norm": (d.steps, d.global_norm.reshape(-1, 1)),
            "grad_norm": (d.steps, d.grad_norm), "grad_nonfinite": (d.steps, d.grad_nonfinite),
            "weight_norm": (d.sample_steps, d.weight_norm), "update_norm": (d.update_steps, d.update_norm),
            "act": (d.act_steps, d.act.reshape(len(d.act_steps), M * len(ACT_FIELDS))),
            "input": (d.input_steps, d.inputs), "amp": (d.amp_steps, d.amp),
            "attn": (d.attn_steps, d.attn.reshape(len(d.attn_steps), len(d.attn_modules) * len(ATTN_FIELDS))),
            "logits": (d.logz_steps, d.logz), "time_grad": (d.time_steps, d.time_grad)}


def attach(watch: "Watch", on_finding: Optional[Callable[[Finding], None]] = None) -> LiveDiagnosis:
    """Attach live diagnosis to a recording watch; returns the listener (its `.findings` grows as it reports)."""
    live = LiveDiagnosis(watch.run_dir, on_finding)
    watch.add_flush_listener(live)
    return live
