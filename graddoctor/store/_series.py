"""The series of a run: one table of what watch writes and how each one is shaped.

Every other place reads this table: the store's documentation, watch's metadata, the reader's
widths and checks (`Run`), live diagnosis and `RunData`. A new series is one row here, plus the
code in watch that measures it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

# Column names of the series whose columns are named fields.
ACT_FIELDS = ("mean", "std", "frac_saturated", "frac_zero", "frac_dead_units", "nonfinite")
INPUT_FIELDS = ("maxabs", "nonfinite", "mean", "std")
AMP_FIELDS = ("scale", "overflow")
# Vanishing through time (graddoctor.core._rnn_time): the recurrent module (its index in the metadata's
# `time_modules`), the sequence length T, and the norm of the last step's gradient carried back to
# TIME_POSITIONS log-spaced lags from the last step (grad_lag0, lag 0) to the first (lag T - 1).
TIME_POSITIONS = 8
TIME_FIELDS = ("module", "seq_len") + tuple(f"grad_lag{k}" for k in range(TIME_POSITIONS))
# Per attention module (graddoctor.core._signals): max |q.k| * scale, max query and key norm per head.
ATTN_FIELDS = ("max_logit", "q_norm", "k_norm")
# The LM head's log Z = logsumexp(logits) over the vocabulary: mean and max over positions.
LOGITS_FIELDS = ("logz_mean", "logz_max")


@dataclass(frozen=True)
class Series:
    """One stored series: rows of `width` columns at the steps it was sampled.

    Attributes:
      name: the name in the store's chunks table.
      dtype: numpy dtype string of the stored array (little-endian).
      columns: "one" (a single value per step), "tensor" (one per watched tensor), "fields" (one per
        name in `fields`), or "module x fields" (one per activation module and field, module-major).
      fields: the column names for "fields" and "module x fields".
      sampling: when a row is written.
      meaning: what a value is.
      every_flush: written on every step, so every flush holds one chunk of it (a reader checks
        that these series agree, so a lost chunk is found).
    """

    name: str
    dtype: str
    columns: str
    sampling: str
    meaning: str
    fields: tuple[str, ...] = ()
    every_flush: bool = False

    def width(self, tensors: int, act_modules: int, fields: Optional[Sequence[str]] = None) -> int:
        """Columns of one row, for a run with `tensors` tensors and `act_modules` activation modules
        (`fields`: the field names the run recorded in its metadata, if they differ from today's)."""
        n_fields = len(fields) if fields else len(self.fields)
        widths = {"one": 1, "tensor": tensors, "fields": n_fields, "module x fields": act_modules * n_fields}
        return widths[self.columns]


SERIES: tuple[Series, ...] = (
    Series("loss", "<f8", "one", "steps given a loss", "the loss passed to step() (none: no row)"),
    Series("grad_total_norm", "<f4", "one", "every step", "global gradient L2 norm (the norm of the per-tensor norms)",
           every_flush=True),
    Series("grad_norm", "<f4", "tensor", "every step", "gradient L2 norm", every_flush=True),
    Series("grad_maxabs", "<f4", "tensor", "every step", "gradient max-abs", every_flush=True),
    Series("grad_nonfinite", "<i8", "tensor", "every step", "NaN/Inf entries in the gradient (-1: no gradient)",
           every_flush=True),
    Series("weight_norm", "<f4", "tensor", "every weight_every steps", "weight L2 norm"),
    Series("update_norm", "<f4", "tensor", "every sample_every steps", "L2 norm of the update applied after that step"),
    Series("act", "<f4", "module x fields", "every activation_every steps", "activation statistics", ACT_FIELDS),
    Series("input", "<f4", "fields", "every step with a training forward", "input batch statistics", INPUT_FIELDS),
    Series("amp", "<f4", "fields", "every step, with scaler=", "the GradScaler's loss scale; 1.0 on an overflow",
           AMP_FIELDS),
    # Its columns are "module:field" for each attention module and ATTN_FIELDS, named in the run's metadata
    # (attn_fields): how many there are depends on the model.
    Series("attn", "<f4", "fields", "every activation_every steps, models with attention",
           "per attention module: max |q.k|/sqrt(d_head) (NaN where q, k are not reachable), max q and k norms"),
    Series("logits", "<f4", "fields", "every activation_every steps, language models",
           "log Z = logsumexp of the LM head's logits: mean and max over positions", LOGITS_FIELDS),
    Series("time_grad", "<f4", "fields", "every activation_every steps, recurrent models",
           "the last time step's gradient carried back through time: its norm at log-spaced lags", TIME_FIELDS),
)
BY_NAME = {s.name: s for s in SERIES}
EVERY_FLUSH = tuple(s.name for s in SERIES if s.every_flush)
# The metadata key under which watch records a series' field names.
FIELDS_META = {"act": "act_fields", "input": "input_fields", "amp": "amp_fields", "attn": "attn_fields",
               "logits": "logits_fields",
               "time_grad": "time_fields"}


def describe() -> str:
    """The table as text lines: `name [columns] dtype, sampling: meaning` (for docs and --help)."""
    return "\n".join(f"{s.name} [{s.columns}] {s.dtype}, {s.sampling}: {s.meaning}" for s in SERIES)
