"""RunData: a run's recorded history as host numpy arrays, plus the derived views every rule uses.

Rules never touch SQLite or torch: they read a `RunData`. `RunData.from_run` loads one from a
stored run; the live path builds one from the same store after each flush; tests build them
directly. Arrays may hold NaN/Inf anywhere and may be empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Optional

import numpy as np

from ..core._amp import overflowed
from ..core._layers import EMBEDDING_NAMES, NORM_NAMES, RECURRENT_NAMES
from ..core._snapshot import measured_mask
from ..store._run import Run
from ..store._series import ACT_FIELDS, ATTN_FIELDS, TIME_FIELDS
from ._robust import safe_log10

# Column indices of an activation row (graddoctor.store._series.ACT_FIELDS).
ACT_MEAN, ACT_STD, ACT_SAT, ACT_ZERO, ACT_DEAD, ACT_NONFINITE = (
    ACT_FIELDS.index(f) for f in ("mean", "std", "frac_saturated", "frac_zero", "frac_dead_units", "nonfinite"))


def _f32(a, shape) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32) if a is None else np.asarray(a, dtype=np.float32)


@dataclass
class RunData:
    """Host arrays of one run: T steps, P tensors, S weight / U update / A activation samples, M modules."""

    steps: np.ndarray                 # int64[T]
    loss: np.ndarray                  # float64[T], NaN where no loss was given (see loss_given)
    global_norm: np.ndarray           # float32[T]
    grad_norm: np.ndarray             # float32[T, P]
    grad_nonfinite: np.ndarray        # int64[T, P], -1 where the tensor had no gradient
    sample_steps: np.ndarray          # int64[S]
    weight_norm: np.ndarray           # float32[S, P]
    update_steps: np.ndarray          # int64[U]
    update_norm: np.ndarray           # float32[U, P]
    tensors: list[str]                # P names from named_parameters()
    tensor_module: list[str]          # P owning module names
    tensor_shape: list[tuple]         # P shapes
    modules: dict[str, str] = field(default_factory=dict)   # module name -> class name
    act_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    act: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, len(ACT_FIELDS)), dtype=np.float32))  # [A, M, F]
    act_modules: list[str] = field(default_factory=list)
    act_kinds: list[str] = field(default_factory=list)
    input_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # maxabs, nonfinite, mean, std
    inputs: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float32))
    amp_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))     # runs with a GradScaler
    amp: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))     # loss scale, overflow
    meta: dict[str, Any] = field(default_factory=dict)
    # bool[T]: steps whose loss was given to watch (a NaN there is a NaN loss). None: every step
    # has one, unless no finite loss was ever recorded (stores that wrote NaN for "no loss").
    loss_given: np.ndarray | None = None
    zero_init_rms: float = 1e-6       # see DiagnoseConfig.zero_init_rms
    # The "structure" event watch records at the first training forward (graddoctor.core._structure):
    # residual / post_norm / same_shape module names, norm_first per torch transformer layer, the
    # first step's lr and initial_lr per group. None: a store written before it (unknown, not "none").
    structure: Optional[dict[str, Any]] = None
    # Attention logits (graddoctor.core._signals): N samples x K attention modules x ATTN_FIELDS; and the
    # LM head's log Z (mean, max) at L samples. Empty for models without them and for older stores.
    attn_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    attn: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, len(ATTN_FIELDS)), dtype=np.float32))
    attn_modules: list[str] = field(default_factory=list)
    logz_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logz: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))
    # The gradient through time of recurrent layers (graddoctor.core._rnn_time): R samples x TIME_FIELDS,
    # and the names its module column indexes. Empty for models without them and for older stores.
    time_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    time_grad: np.ndarray = field(default_factory=lambda: np.zeros((0, len(TIME_FIELDS)), dtype=np.float32))
    time_modules: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(cls, run: Run) -> "RunData":
        """Load every series of a stored run (one read per series)."""
        P = len(run.tensors)
        steps, gnorm = run.global_norm()
        loss, given = align_loss(steps, *run.loss())
        _, gn = run.series("grad_norm")
        _, nf = run.series("grad_nonfinite")
        s_steps, wn = run.series("weight_norm")
        u_steps, un = run.series("update_norm")
        a_steps, act = run.activations()
        i_steps, inp = run.inputs()
        amp_steps, amp = run.amp()
        T = len(steps)
        return cls(
            steps=steps.astype(np.int64), loss=loss, loss_given=given if run.loss_rows_given else None,
            global_norm=_f32(gnorm, (T,)),
            grad_norm=_f32(gn, (T, P)),
            grad_nonfinite=np.zeros((T, P), np.int64) if nf is None else nf.astype(np.int64),
            sample_steps=s_steps.astype(np.int64), weight_norm=_f32(wn, (len(s_steps), P)),
            update_steps=u_steps.astype(np.int64), update_norm=_f32(un, (len(u_steps), P)),
            tensors=list(run.tensors), tensor_module=[run.tensor_module[t] for t in run.tensors],
            tensor_shape=[tuple(run.tensor_shape[t]) for t in run.tensors],
            modules=dict(run.meta.get("modules") or {}),
            act_steps=a_steps.astype(np.int64), act=np.asarray(act, dtype=np.float32),
            act_modules=list(run.activation_modules),
            act_kinds=[run.activation_kinds[m] for m in run.activation_modules],
            input_steps=i_steps.astype(np.int64), inputs=np.asarray(inp, dtype=np.float32), meta=dict(run.meta),
            amp_steps=amp_steps.astype(np.int64), amp=np.asarray(amp, dtype=np.float32),
            structure=read_structure(run), **read_signals(run), **read_time(run))

    # ------------------------------------------------------------------ structure
    @property
    def T(self) -> int:
        return len(self.steps)

    @property
    def P(self) -> int:
        return len(self.tensors)

    def module_class(self, module: str) -> str:
        return self.modules.get(module, "")

    @cached_property
    def recurrent_modules(self) -> list[str]:
        return [m for m, c in self.modules.items() if c in RECURRENT_NAMES]

    @property
    def residual(self) -> Optional[frozenset[str]]:
        """The residual modules (output = input + branch) seen in the first forward; None if not recorded."""
        return None if self.structure is None else frozenset(self.structure.get("residual", ()))

    @property
    def has_residual(self) -> bool:
        """True only when the store says so: an old store without the structure is not called residual."""
        return bool(self.residual)

    @property
    def post_norm(self) -> frozenset[str]:
        """Residual modules whose add sits under a normalization (post-LN), and torch layers with norm_first=False."""
        if self.structure is None:
            return frozenset()
        torch_post = {n for n, first in (self.structure.get("norm_first") or {}).items() if not first}
        return frozenset(self.structure.get("post_norm", ())) | torch_post

    @property
    def lr_warmup(self) -> Optional[bool]:
        """Whether the run started below its scheduler's base lr (a warmup); None if not known.

        `initial_lr` is set by every PyTorch LR scheduler; at step 0 a warmup holds lr well below it.
        """
        if self.structure is None:
            return None
        pairs = [(lr, base) for lr, base in zip(self.structure.get("lr") or [], self.structure.get("initial_lr") or [])
                 if isinstance(lr, (int, float)) and isinstance(base, (int, float))]
        return any(lr < 0.5 * base for lr, base in pairs)

    def is_recurrent_tensor(self, i: int) -> bool:
        return self.module_class(self.tensor_module[i]) in RECURRENT_NAMES

    @cached_property
    def initial_weight_rms(self) -> np.ndarray:
        """RMS of each tensor at its first finite weight sample (NaN if never sampled finite)."""
        out = np.full(self.P, np.nan)
        if len(self.weight_norm) == 0 or self.P == 0:
            return out
        w = self.weight_norm.astype(np.float64)
        finite = np.isfinite(w)
        first = np.argmax(finite, axis=0)
        has = finite.any(axis=0)
        numel = np.array([max(1, int(np.prod(s))) if len(s) else 1 for s in self.tensor_shape], dtype=np.float64)
        out[has] = w[first[has], np.flatnonzero(has)] / np.sqrt(numel[has])
        return out

    @cached_property
    def eligible(self) -> np.ndarray:
        """Indices of the weight matrices the ratio rules judge, input side first.

        Left out on purpose: biases and other 1-D/0-D tensors (ReZero scales, norm gains),
        normalization and embedding layers (their gradients scale differently by design), and
        tensors initialised to zero (residual-branch ends: their ratios are undefined at first).
        """
        rms = self.initial_weight_rms
        zero_tol = self.zero_init_rms
        keep = [i for i in range(self.P)
                if len(self.tensor_shape[i]) >= 2 and int(np.prod(self.tensor_shape[i])) > 1
                and self.module_class(self.tensor_module[i]) not in NORM_NAMES | EMBEDDING_NAMES
                and np.isfinite(rms[i]) and rms[i] > zero_tol]
        return np.asarray(keep, dtype=np.int64)

    def names(self, idx) -> list[str]:
        return [self.tensors[int(i)] for i in idx]

    # ------------------------------------------------------------------ aligned ratios
    def weight_at(self, steps: np.ndarray) -> np.ndarray:
        """Weight norms [len(steps), P] from the latest sample at or before each step (the first sample before it)."""
        if len(self.sample_steps) == 0:
            return np.full((len(steps), self.P), np.nan, dtype=np.float32)
        idx = np.clip(np.searchsorted(self.sample_steps, steps, side="right") - 1, 0, len(self.sample_steps) - 1)
        return self.weight_norm[idx]

    @cached_property
    def log_grad(self) -> np.ndarray:
        """log10 of the eligible tensors' gradient norms [T, E] (float32); NaN where the tensor had no gradient."""
        e = self.eligible
        if len(e) == 0 or self.T == 0:
            return np.zeros((self.T, 0), dtype=np.float32)
        lg = safe_log10(self.grad_norm[:, e].astype(np.float32, copy=False))
        lg[self.grad_nonfinite[:, e] < 0] = np.nan
        return lg

    @cached_property
    def log_grad_ratio(self) -> np.ndarray:
        """log10(grad norm / weight norm) [T, E] for the eligible tensors; NaN where either is missing/non-finite."""
        e = self.eligible
        if len(e) == 0 or self.T == 0:
            return np.zeros((self.T, 0), dtype=np.float32)
        if len(self.sample_steps) == 0:
            return np.full((self.T, len(e)), np.nan, dtype=np.float32)
        lw = safe_log10(self.weight_norm[:, e].astype(np.float32, copy=False))  # per sample: cheap
        idx = np.clip(np.searchsorted(self.sample_steps, self.steps, side="right") - 1, 0, len(self.sample_steps) - 1)
        with np.errstate(invalid="ignore"):  # inf - inf: both non-finite, NaN below anyway
            r = self.log_grad - lw[idx]
        r[~np.isfinite(r)] = np.nan
        return r

    @cached_property
    def update_measured(self) -> np.ndarray:
        """bool [U, P]: the update norms measured at each sample (a bounded snapshot measures a subset per
        sample, NaN elsewhere: graddoctor.core._snapshot); all True for full snapshots and older stores."""
        return measured_mask(self.meta.get("update_snapshot"), self.update_steps, len(self.tensors))

    @cached_property
    def log_update_ratio(self) -> np.ndarray:
        """log10(update norm / weight norm) [U, E] at the update samples; +inf where the update was non-finite,
        NaN where it was not measured at that sample (a bounded snapshot's other tensors)."""
        e = self.eligible
        if len(e) == 0 or len(self.update_steps) == 0:
            return np.zeros((len(self.update_steps), 0))
        u = self.update_norm[:, e].astype(np.float64)
        w = self.weight_at(self.update_steps)[:, e].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            r = safe_log10(u) - safe_log10(w)
        r = np.where(~np.isfinite(u), np.inf, np.where(np.isfinite(r), r, np.nan))
        return np.where(self.update_measured[:, e], r, np.nan)

    # ------------------------------------------------------------------ mixed precision
    @cached_property
    def amp_overflow_steps(self) -> np.ndarray:
        """Steps on which the run's GradScaler found an overflow and skipped the optimizer step."""
        if len(self.amp_steps) == 0:
            return np.zeros(0, dtype=np.int64)
        return self.amp_steps[overflowed(self.amp)]

    def without_scale_overflows(self) -> "RunData":
        """This run without the steps its GradScaler skipped for an overflow of the loss scale alone.

        Their gradients are the loss scale's overflow, not the model's, and the optimizer never
        applied them. A skipped step whose loss is non-finite too stays: the forward pass went
        bad, and that is the model's (or the data's) doing. The `amp` series is kept whole.
        """
        if len(self.amp_overflow_steps) == 0:
            return self
        skipped = np.isin(self.steps, self.amp_overflow_steps)
        drop = skipped & (np.isfinite(self.loss) | ~self.given)
        if not drop.any():
            return self
        keep = ~drop
        return replace(self, steps=self.steps[keep], loss=self.loss[keep], loss_given=self.given[keep],
                       global_norm=self.global_norm[keep], grad_norm=self.grad_norm[keep],
                       grad_nonfinite=self.grad_nonfinite[keep])

    # ------------------------------------------------------------------ per-step flags
    @cached_property
    def grad_bad(self) -> np.ndarray:
        """Steps whose gradients (any tensor, or the global norm) held NaN/Inf."""
        if self.T == 0:
            return np.zeros(0, dtype=bool)
        any_tensor = (self.grad_nonfinite > 0).any(axis=1) if self.P else np.zeros(self.T, dtype=bool)
        return any_tensor | ~np.isfinite(self.global_norm)

    @cached_property
    def given(self) -> np.ndarray:
        """bool[T]: the steps that have a loss (a step without one is missing, not a NaN loss)."""
        if self.loss_given is not None:
            return np.asarray(self.loss_given, dtype=bool)
        return np.full(self.T, bool(np.isfinite(self.loss).any()))

    @cached_property
    def loss_recorded(self) -> bool:
        """False when no step has a loss."""
        return bool(self.given.any())

    @cached_property
    def loss_bad(self) -> np.ndarray:
        """Steps whose given loss is NaN/Inf."""
        return self.given & ~np.isfinite(self.loss)

    def carry_given(self, values: np.ndarray, before: Any = np.nan) -> np.ndarray:
        """[T]: for each step, the entry of `values` (one per given loss, in order) of the last step at or
        before it that has a loss; `before` on the steps ahead of the first one."""
        last = np.cumsum(self.given) - 1  # index of the last given loss at or before each step
        return np.where(last >= 0, np.asarray(values)[np.maximum(last, 0)] if len(values) else before, before)

    @cached_property
    def loss_carried(self) -> np.ndarray:
        """float64[T]: each step's loss, or the last given loss before it (NaN before the first)."""
        return self.carry_given(self.loss[self.given])

    @cached_property
    def input_bad_steps(self) -> np.ndarray:
        """Steps whose input batch held NaN/Inf."""
        if len(self.input_steps) == 0:
            return np.zeros(0, dtype=np.int64)
        x = self.inputs
        bad = (np.nan_to_num(x[:, 1], nan=1.0) > 0) | ~np.isfinite(x[:, 0])
        return self.input_steps[bad]

    def step_range(self, mask: np.ndarray, steps: np.ndarray | None = None) -> tuple[int, int]:
        s = (self.steps if steps is None else steps)[np.asarray(mask, dtype=bool)]
        return (int(s[0]), int(s[-1])) if len(s) else (0, 0)

    def initial_loss_level(self, n: int = 10) -> float:
        """Median of the first n finite losses (NaN if none)."""
        return initial_level(self.loss, n)


def read_structure(run: Run) -> Optional[dict[str, Any]]:
    """The first "structure" event's data, or None when the run has none (older stores, a compiled model)
    or its fields are not what watch writes."""
    events = run.events("structure")
    if not events:
        return None
    data = events[0]["data"]
    lists = ("residual", "post_norm", "same_shape", "lr", "initial_lr")
    if not all(isinstance(data.get(k, []), list) for k in lists) or not isinstance(data.get("norm_first", {}), dict):
        return None
    return data


def read_signals(run: Run) -> dict[str, Any]:
    """The attention and log Z series as RunData fields (empty where the run has none)."""
    columns = [c.rpartition(":")[0] for c in (run.meta.get("attn_fields") or [])]
    modules = list(dict.fromkeys(columns))
    out: dict[str, Any] = {}
    a_steps, attn = run.series("attn")
    if attn is not None and modules and attn.shape[1] == len(modules) * len(ATTN_FIELDS):
        out.update(attn_steps=a_steps.astype(np.int64), attn_modules=modules,
                   attn=np.asarray(attn, dtype=np.float32).reshape(len(a_steps), len(modules), len(ATTN_FIELDS)))
    z_steps, logz = run.series("logits")
    if logz is not None:
        out.update(logz_steps=z_steps.astype(np.int64), logz=np.asarray(logz, dtype=np.float32))
    return out


def read_time(run: Run) -> dict[str, Any]:
    """The time_grad series as RunData fields (empty where the run has none, or recorded other fields)."""
    steps, rows = run.series("time_grad")
    if rows is None or list(run.meta.get("time_fields") or []) != list(TIME_FIELDS):
        return {}
    return dict(time_steps=steps.astype(np.int64), time_grad=np.asarray(rows, dtype=np.float32),
                time_modules=[str(m) for m in run.meta.get("time_modules") or []])


def initial_level(loss: np.ndarray, n: int = 10) -> float:
    """Median of the first n finite values of a loss series (NaN if none): where the run started."""
    finite = loss[np.isfinite(loss)]
    return float(np.median(finite[:n])) if len(finite) else float("nan")


def align_loss(steps: np.ndarray, loss_steps: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(loss float64[T] on `steps`, NaN where missing; given bool[T]) from the loss series' own steps
    (both ascending, as the store returns them)."""
    given = np.isin(steps, loss_steps)
    out = np.full(len(steps), np.nan)
    out[given] = np.asarray(loss, dtype=np.float64).reshape(-1)[np.isin(loss_steps, steps)]
    return out, given
