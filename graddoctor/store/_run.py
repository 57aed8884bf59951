"""Reading a recorded run: histories as numpy arrays, per tensor and per layer.

    run = gd.open_run("runs/exp1")
    h = run.layer_history("net.3")      # steps, grad_norm, grad_maxabs, grad_nonfinite, weight_norm, ...
    steps, loss = run.loss()

Opening is cheap; each series is read from SQLite once per `Run` and cached.
A `Run` may be opened while the run is still being written (WAL readers never
block the writer); call `refresh()` to see newer flushes.
"""
from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .._errors import CorruptStoreError, GradDoctorError
from . import _nonfinite_json
from ._series import ACT_FIELDS, BY_NAME, EVERY_FLUSH, FIELDS_META, SERIES, Series
from ._store import _COLUMNS, open_store, read_series, store_path


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
        """Forget cached series, so the next read sees flushes written since.

        Raises `CorruptStoreError`, naming what is wrong, for metadata graddoctor never writes: invalid
        JSON, tensor or activation-module rows missing or of the wrong type, series whose width does
        not match them.
        """
        self._cache: dict[str, tuple[np.ndarray, Optional[np.ndarray]]] = {}
        try:
            meta = self._con.execute("SELECT key, value FROM meta").fetchall()
            rows = self._con.execute("SELECT idx, name, module, shape, numel, dtype FROM tensors "
                                     "ORDER BY idx").fetchall()
            acts = self._con.execute("SELECT idx, name, kind, lo, hi, relu_family FROM act_modules "
                                     "ORDER BY idx").fetchall()
            widths = {s.name: self._con.execute("SELECT width FROM chunks WHERE series=? LIMIT 1", (s.name,)).fetchone()
                      for s in SERIES}
            # (chunks, last chunk's first step) of the series written on every step, from the index alone
            spans = self._con.execute(f"SELECT series, count(*), max(first_step) FROM chunks WHERE series IN "
                                      f"({', '.join('?' * len(EVERY_FLUSH))}) GROUP BY series", EVERY_FLUSH).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._corrupt(f"its tables cannot be read ({e})") from e
        self.meta: dict[str, Any] = {k: self._json(f"meta {k!r}", v) for k, v in meta}
        for key, (ok, expected) in _META_TYPES.items():
            if key in self.meta and not ok(self.meta[key]):
                raise self._corrupt(f"meta {key!r} is {_short(self.meta[key])}; expected {expected}")
        self._check_rows("tensors", rows, "tensor", {2: str, 5: str})
        self.tensors: list[str] = [r[1] for r in rows]
        self.tensor_module: dict[str, str] = {r[1]: r[2] for r in rows}
        self.tensor_numel: dict[str, int] = {r[1]: r[4] for r in rows}
        self.tensor_shape: dict[str, list[int]] = {}
        for r in rows:
            shape = self._json(f"tensor {r[1]!r}'s shape", r[3])
            if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
                raise self._corrupt(f"tensor {r[1]!r} has shape {_short(r[3])}; expected a JSON list of sizes")
            if not _is_int(r[4]) or r[4] < 0:
                raise self._corrupt(f"tensor {r[1]!r} has numel {_short(r[4])}; expected an integer >= 0")
            self.tensor_shape[r[1]] = shape
        self._check_rows("act_modules", acts, "activation module", {2: str, 5: int})
        self.activation_modules: list[str] = [a[1] for a in acts]
        self.activation_kinds: dict[str, str] = {a[1]: a[2] for a in acts}
        self.activation_relu_family: dict[str, bool] = {a[1]: bool(a[5]) for a in acts}
        for series, row in widths.items():
            want, why = self.width(series), _width_reason(self, BY_NAME[series])
            if row is not None and row[0] != want:
                raise self._corrupt(f"series {series!r} has width {_short(row[0])}; expected {want} ({why})")
        for series, n, last in spans[1:]:
            if (n, last) != tuple(spans[0][1:]):
                raise self._corrupt(f"series {series!r} has {n} chunks up to step {last} but {spans[0][0]!r} has "
                                    f"{spans[0][1]} up to step {spans[0][2]}: flushes are missing from one of them")

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"corrupt run store {str(store_path(self.run_dir))!r}: {what}")

    def _json(self, what: str, text: Any) -> Any:
        try:
            return _nonfinite_json.loads(text)
        except (TypeError, ValueError, RecursionError) as e:
            raise self._corrupt(f"{what} is {_short(text)}, not valid JSON ({e})") from e

    def _check_rows(self, table: str, rows: list[tuple], what: str, types: dict[int, type]) -> None:
        """Rows (idx, name, ...) numbered 0..n-1 in order, with unique text names and these column types."""
        numbers = [r[0] for r in rows]
        if numbers != list(range(len(rows))):
            raise self._corrupt(f"the {table} table is numbered {_short(numbers)}; expected 0 to {len(rows) - 1} "
                                "in order (rows are missing)")
        names: set[str] = set()
        for r in rows:
            if not isinstance(r[1], str):
                raise self._corrupt(f"{what} row {r[0]} has name {_short(r[1])}; expected text")
            if r[1] in names:
                raise self._corrupt(f"{what} name {r[1]!r} appears twice in the {table} table")
            names.add(r[1])
            for col, typ in types.items():
                if not isinstance(r[col], typ):
                    column = _COLUMNS[table][col]
                    raise self._corrupt(f"{what} {r[1]!r} has {column} {_short(r[col])}; expected "
                                        f"{'text' if typ is str else 'an integer'}")

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

    def width(self, name: str) -> int:
        """Columns of one row of a series in this run (see graddoctor.store._series)."""
        series = BY_NAME[name]
        recorded = self.meta.get(FIELDS_META.get(name, ""))  # the fields the run was written with
        return series.width(len(self.tensors), len(self.activation_modules), recorded)

    def _matrix(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, data [T, width]) of a series, an empty [0, width] array if it was never written."""
        steps, data = self.series(name)
        if data is None:
            return steps, np.zeros((0, self.width(name)), dtype=np.dtype(BY_NAME[name].dtype))
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
        steps, data = self._matrix("loss")
        return steps, data[:, 0]

    def global_norm(self) -> tuple[np.ndarray, np.ndarray]:
        steps, data = self._matrix("grad_total_norm")
        return steps, data[:, 0]

    def events(self, kind: Optional[str] = None) -> list[dict[str, Any]]:
        """Recorded events (interventions, notes) as dicts with step, kind and data (a dict).

        Raises `CorruptStoreError` for an event whose step is not an integer or whose data is not a JSON object.
        """
        q = "SELECT id, step, kind, data FROM events" + (" WHERE kind=?" if kind else "") + " ORDER BY id"
        try:
            rows = self._con.execute(q, (kind,) if kind else ()).fetchall()
        except sqlite3.DatabaseError as e:
            raise self._corrupt(f"its events cannot be read ({e})") from e
        out = []
        for i, s, k, d in rows:
            if not _is_int(s):
                raise self._corrupt(f"event {i} has step {_short(s)}; expected an integer")
            if not isinstance(k, str):
                raise self._corrupt(f"event {i} has kind {_short(k)}; expected text")
            data = self._json(f"event {i}'s data", d)
            if not isinstance(data, dict):
                raise self._corrupt(f"event {i} has data {_short(d)}; expected a JSON object")
            for name, (ok, expected) in _EVENT_FIELDS.get(k, {}).items():
                if name in data and not ok(data[name]):
                    raise self._corrupt(f"event {i} ({k}) has {name} {_short(data[name])}; expected {expected}")
            out.append(dict(step=s, kind=k, data=data))
        return out

    # -------------------------------------------------------------- history
    def _columns(self, names: list[str]) -> list[int]:
        index = {t: i for i, t in enumerate(self.tensors)}
        missing = [n for n in names if n not in index]
        if missing:
            more = " ..." if len(self.tensors) > 8 else ""
            raise GradDoctorError(f"unknown tensor(s) {missing}; this run has {self.tensors[:8]}{more}")
        return [index[n] for n in names]

    def tensor_history(self, name: str) -> History:
        """History of one parameter tensor, by its `named_parameters()` name."""
        return self._history(name, self._columns([name]))

    def layer_history(self, module: str) -> History:
        """History of one module's parameters combined.

        Norms as the sqrt of summed squares, the max of max-abs, summed non-finite counts.
        """
        cols = [i for i, t in enumerate(self.tensors) if self.tensor_module[t] == module]
        if not cols:
            raise GradDoctorError(f"unknown layer {module!r}; this run's layers are {self.layers}")
        return self._history(module, cols)

    def _history(self, name: str, cols: list[int]) -> History:
        steps, norm = self._matrix("grad_norm")
        _, maxabs = self._matrix("grad_maxabs")
        _, count = self._matrix("grad_nonfinite")
        s_steps, weight = self._matrix("weight_norm")
        u_steps, update = self._matrix("update_norm")
        c = count[:, cols]
        missing = (c < 0).all(axis=1)
        return History(
            name=name, steps=steps,
            grad_norm=_combine_norms(norm[:, cols], c >= 0),
            grad_maxabs=np.where(missing, np.nan,
                                 np.max(np.where(c >= 0, maxabs[:, cols], -np.inf), axis=1, initial=-np.inf)),
            grad_nonfinite=np.where(missing, -1, np.where(c >= 0, c, 0).sum(axis=1)),
            sample_steps=s_steps, weight_norm=_combine_norms(weight[:, cols]),
            update_steps=u_steps, update_norm=_combine_norms(update[:, cols]),
        )

    def activations(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps [S], stats [S, M, len(ACT_FIELDS)]) of the sampled activation statistics."""
        steps, data = self._matrix("act")
        fields = len(self.meta.get("act_fields") or ACT_FIELDS)
        return steps, data.reshape(len(steps), len(self.activation_modules), fields)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, [T, 4]) input-batch statistics: maxabs, nonfinite, mean, std."""
        return self._matrix("input")

    def amp(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, [T, 2]) of a run watched with a GradScaler: the loss scale of each step, and 1.0
        where the scaler found an overflow and skipped the optimizer step (empty without a scaler)."""
        return self._matrix("amp")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value for an error message, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_time(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 253402300800


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# Metadata the readers rely on: key -> (test, what is expected). Other keys are kept as they are.
_META_TYPES: dict[str, tuple[Any, str]] = {
    "modules": (lambda v: isinstance(v, dict) and all(isinstance(c, str) for c in v.values()),
                "a JSON object of module name -> class name"),
    "act_fields": (_is_names, "a JSON list of field names"),
    "input_fields": (_is_names, "a JSON list of field names"),
    "amp_fields": (_is_names, "a JSON list of field names"),
    "created": (_is_time, "a Unix time (seconds since 1970, before the year 10000)"),
    "closed_at": (_is_time, "a Unix time (seconds since 1970, before the year 10000)"),
}

# Fields of the events graddoctor writes that its readers use: kind -> field -> (test, what is expected).
_EVENT_FIELDS: dict[str, dict[str, tuple[Any, str]]] = {
    "finding": {"code": (lambda v: isinstance(v, str), "text"), "severity": (lambda v: isinstance(v, str), "text")},
    "skipped_step": {"bad": (_is_names, "a JSON list of tensor names")},
}


def _width_reason(r: "Run", series: Series) -> str:
    return {"one": "one value per step",
            "tensor": f"one column per tensor, and the tensors table lists {len(r.tensors)} tensors",
            "fields": "one column per field",
            "module x fields": f"{len(r.activation_modules)} activation modules x their fields"}[series.columns]


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
