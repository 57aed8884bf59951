"""Reading a recorded run: histories as numpy arrays, per tensor and per layer.

    run = gd.open_run("runs/exp1")
    h = run.layer_history("net.3")      # steps, grad_norm, grad_maxabs, grad_nonfinite, weight_norm, ...
    steps, loss = run.loss()

Opening is cheap; each series is read from SQLite once per `Run` and cached.
A `Run` may be opened while the run is still being written (WAL readers never
block the writer); call `refresh()` to see newer flushes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import _nonfinite_json
from ._errors import GradDoctorError
from ._store import open_store, read_series


@dataclass(frozen=True)
class History:
    """One tensor's or one layer's history. Arrays are aligned on `steps` unless named `*_steps`.

    grad_nonfinite is -1 on steps where the tensor had no gradient (then grad_norm is NaN).
    weight_norm is recorded every `weight_every` steps (default every step), at `sample_steps`;
    update_norm every `sample_every` steps, at `update_steps`.
    """

    name: str
    steps: np.ndarray
    grad_norm: np.ndarray
    grad_maxabs: np.ndarray
    grad_nonfinite: np.ndarray
    sample_steps: np.ndarray
    weight_norm: np.ndarray
    update_steps: np.ndarray
    update_norm: np.ndarray


class Run:
    """A read-only view of one run directory's store."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._con = open_store(self.run_dir)
        self.refresh()

    def refresh(self) -> None:
        """Forget cached series, so the next read sees flushes written since."""
        self._cache: dict[str, tuple[np.ndarray, Optional[np.ndarray]]] = {}
        self.meta: dict[str, Any] = {k: _nonfinite_json.loads(v) for k, v in self._con.execute("SELECT key, value FROM meta")}
        rows = self._con.execute("SELECT name, module, shape, numel, dtype FROM tensors ORDER BY idx").fetchall()
        self.tensors: list[str] = [r[0] for r in rows]
        self.tensor_module: dict[str, str] = {r[0]: r[1] for r in rows}
        self.tensor_numel: dict[str, int] = {r[0]: r[3] for r in rows}
        self.tensor_shape: dict[str, list[int]] = {r[0]: _nonfinite_json.loads(r[2]) for r in rows}
        acts = self._con.execute("SELECT name, kind, lo, hi, relu_family FROM act_modules ORDER BY idx").fetchall()
        self.activation_modules: list[str] = [a[0] for a in acts]
        self.activation_kinds: dict[str, str] = {a[0]: a[1] for a in acts}
        self.activation_relu_family: dict[str, bool] = {a[0]: bool(a[4]) for a in acts}

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ raw series
    def series(self, name: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(steps, data [T, width]) of a stored series (see `_store` for the list); data None if absent."""
        if name not in self._cache:
            self._cache[name] = read_series(self._con, name)
        return self._cache[name]

    def _matrix(self, name: str, width: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        steps, data = self.series(name)
        if data is None:
            return steps, np.zeros((0, width), dtype=dtype)
        return steps, data

    @property
    def layers(self) -> list[str]:
        """Modules that own watched parameters, in parameter order ('' is the root module)."""
        return list(dict.fromkeys(self.tensor_module[t] for t in self.tensors))

    @property
    def num_steps(self) -> int:
        """The step after the last recorded one (every recorded step has a global gradient norm)."""
        steps, _ = self.series("grad_total_norm")
        return int(steps[-1]) + 1 if len(steps) else 0

    @property
    def loss_rows_given(self) -> bool:
        """True for stores that write a loss row only where a loss was given (older ones wrote NaN)."""
        return self.meta.get("loss_rows") == "given"

    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, loss) of the steps that were given a loss; a NaN here is a NaN loss.

        Steps recorded without a loss (`w.step()` with none) have no entry. Stores written before
        this distinction (see `loss_rows_given`) hold NaN for them instead.
        """
        steps, data = self._matrix("loss", 1, np.float64)
        return steps, data[:, 0]

    def global_norm(self) -> tuple[np.ndarray, np.ndarray]:
        steps, data = self._matrix("grad_total_norm", 1, np.float32)
        return steps, data[:, 0]

    def events(self, kind: Optional[str] = None) -> list[dict[str, Any]]:
        """Recorded events (interventions, notes) as dicts with step, kind and data."""
        q = "SELECT step, kind, data FROM events" + (" WHERE kind=?" if kind else "") + " ORDER BY id"
        rows = self._con.execute(q, (kind,) if kind else ()).fetchall()
        return [dict(step=s, kind=k, data=_nonfinite_json.loads(d)) for s, k, d in rows]

    # -------------------------------------------------------------- history
    def _columns(self, names: list[str]) -> list[int]:
        index = {t: i for i, t in enumerate(self.tensors)}
        missing = [n for n in names if n not in index]
        if missing:
            raise GradDoctorError(f"unknown tensor(s) {missing}; this run has {self.tensors[:8]}{' ...' if len(self.tensors) > 8 else ''}")
        return [index[n] for n in names]

    def tensor_history(self, name: str) -> History:
        """History of one parameter tensor, by its `named_parameters()` name."""
        return self._history(name, self._columns([name]))

    def layer_history(self, module: str) -> History:
        """History of one module's parameters combined: norms as sqrt of summed squares, max of max-abs, summed counts."""
        cols = [i for i, t in enumerate(self.tensors) if self.tensor_module[t] == module]
        if not cols:
            raise GradDoctorError(f"unknown layer {module!r}; this run's layers are {self.layers}")
        return self._history(module, cols)

    def _history(self, name: str, cols: list[int]) -> History:
        P = len(self.tensors)
        steps, norm = self._matrix("grad_norm", P, np.float32)
        _, maxabs = self._matrix("grad_maxabs", P, np.float32)
        _, count = self._matrix("grad_nonfinite", P, np.int64)
        s_steps, weight = self._matrix("weight_norm", P, np.float32)
        u_steps, update = self._matrix("update_norm", P, np.float32)
        c = count[:, cols]
        missing = (c < 0).all(axis=1)
        return History(
            name=name, steps=steps,
            grad_norm=_combine_norms(norm[:, cols], c >= 0),
            grad_maxabs=np.where(missing, np.nan, np.max(np.where(c >= 0, maxabs[:, cols], -np.inf), axis=1, initial=-np.inf)),
            grad_nonfinite=np.where(missing, -1, np.where(c >= 0, c, 0).sum(axis=1)),
            sample_steps=s_steps, weight_norm=_combine_norms(weight[:, cols]),
            update_steps=u_steps, update_norm=_combine_norms(update[:, cols]),
        )

    def activations(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps [S], stats [S, M, len(ACT_FIELDS)]) of the sampled activation statistics."""
        fields = len(self.meta.get("act_fields", [])) or 6
        steps, data = self.series("act")
        if data is None:
            return steps, np.zeros((0, len(self.activation_modules), fields), dtype=np.float32)
        return steps, data.reshape(len(steps), len(self.activation_modules), fields)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, [T, 4]) input-batch statistics: maxabs, nonfinite, mean, std."""
        return self._matrix("input", 4, np.float32)

    def amp(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, [T, 2]) of a run watched with a GradScaler: the loss scale of each step, and 1.0
        where the scaler found an overflow and skipped the optimizer step (empty without a scaler)."""
        return self._matrix("amp", 2, np.float32)


def _combine_norms(norms: np.ndarray, present: Optional[np.ndarray] = None) -> np.ndarray:
    """sqrt(sum of squares) over columns; NaN where no column was present."""
    n = norms.astype(np.float64)
    if present is None:
        return np.sqrt(np.square(n).sum(axis=1)) if n.shape[1] else np.zeros(len(n))
    out = np.sqrt(np.where(present, np.square(n), 0.0).sum(axis=1))
    return np.where(present.any(axis=1), out, np.nan)


def open_run(run_dir: str | Path) -> Run:
    """Open a recorded run for reading. Raises `RunNotFoundError` / `CorruptStoreError` with the path."""
    return Run(run_dir)
