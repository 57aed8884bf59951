"""The run store: one SQLite file per run directory (stdlib sqlite3, WAL mode).

Schema (version 1):

  meta(key TEXT PRIMARY KEY, value TEXT)
      JSON values: schema_version, created, torch_version, config, model_class, world_size;
      closed_at (a Unix time) once `Watch.close()` has written the last flush.
  tensors(idx INTEGER PRIMARY KEY, name TEXT, module TEXT, shape TEXT, numel INTEGER, dtype TEXT)
      one row per watched parameter tensor, in the order of every per-tensor vector.
  act_modules(idx INTEGER PRIMARY KEY, name TEXT, kind TEXT, lo REAL, hi REAL, relu_family INTEGER)
      one row per watched activation module, in the order of every activation row.
  chunks(series TEXT, first_step INTEGER, last_step INTEGER, steps BLOB, dtype TEXT,
         width INTEGER, codec TEXT, data BLOB, PRIMARY KEY(series, first_step))
      one row per series per flush: `steps` is int64[n], `data` is dtype[n, width],
      little-endian, raw or zlib-compressed (`codec`). Floats are stored as bytes,
      so NaN and Inf come back exactly (SQLite would turn a REAL NaN into NULL).
  events(id INTEGER PRIMARY KEY, step INTEGER, kind TEXT, data TEXT)
      interventions and notes (clipping, skipped steps, rollbacks, findings); `data`
      is JSON with non-finite floats spelled "NaN"/"Infinity" (see _nonfinite_json).
      Live diagnosis writes kind "finding" with data = `Finding.to_dict()` (code, severity,
      first_step, last_step, layers, evidence, cause, message, remedies) at step = last_step.

Series written by `watch` (width in brackets, P tensors, M activation modules):
  loss [1] f64, grad_total_norm [1] f32, grad_norm [P] f32, grad_maxabs [P] f32,
  grad_nonfinite [P] i64 (-1: no gradient that step), weight_norm [P] f32 (every weight_every steps),
  update_norm [P] f32 (sampled; the update applied at that step), act [M*6] f32 (sampled),
  input [4] f32 (maxabs, nonfinite, mean, std of each batch),
  amp [2] f32 (with a GradScaler: the step's loss scale, and 1.0 where the scaler found an overflow).

Crash safety: each flush is one transaction; WAL with synchronous=NORMAL keeps
every committed flush through a killed process. Readers never block the writer.
"""
from __future__ import annotations

import json
import sqlite3
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from . import _nonfinite_json
from ._errors import CorruptStoreError, RunNotFoundError

STORE_NAME = "graddoctor.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensors(idx INTEGER PRIMARY KEY, name TEXT NOT NULL, module TEXT NOT NULL,
    shape TEXT NOT NULL, numel INTEGER NOT NULL, dtype TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS act_modules(idx INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL,
    lo REAL, hi REAL, relu_family INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks(series TEXT NOT NULL, first_step INTEGER NOT NULL,
    last_step INTEGER NOT NULL, steps BLOB NOT NULL, dtype TEXT NOT NULL, width INTEGER NOT NULL,
    codec TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY(series, first_step));
CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY AUTOINCREMENT, step INTEGER NOT NULL,
    kind TEXT NOT NULL, data TEXT NOT NULL);
"""

# Integer series are mostly zeros and compress ~40x; float series barely compress.
_ZLIB_DTYPES = {"<i8", "<i4"}


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_NAME


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode={'ro' if readonly else 'rwc'}"
    con = sqlite3.connect(uri, uri=True, timeout=30.0, check_same_thread=False)
    if not readonly:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
    return con


def encode_array(data: np.ndarray) -> tuple[str, str, bytes]:
    """(dtype string, codec, bytes) for a 2-D array, little-endian."""
    dtype = data.dtype.newbyteorder("<").str
    raw = np.ascontiguousarray(data, dtype=dtype).tobytes()
    if dtype in _ZLIB_DTYPES:
        return dtype, "zlib", zlib.compress(raw, 1)
    return dtype, "raw", raw


def decode_array(dtype: str, codec: str, width: int, blob: bytes) -> np.ndarray:
    raw = zlib.decompress(blob) if codec == "zlib" else blob
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(-1, width)


class RunWriter:
    """Writes one run's store. Only the recording rank (rank 0) creates one."""

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], tensors: list[dict], act_modules: list[dict]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = store_path(self.run_dir)
        self._con = _connect(self.path, readonly=False)
        self._con.executescript(_SCHEMA)
        meta = {"schema_version": SCHEMA_VERSION, "created": time.time(), **meta}
        with self._con:
            self._con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                  [(k, _nonfinite_json.dumps(v)) for k, v in meta.items()])
            self._con.execute("DELETE FROM meta WHERE key='closed_at'")  # a run recorded again is open again
            self._con.execute("DELETE FROM tensors")
            self._con.executemany("INSERT INTO tensors VALUES (:idx, :name, :module, :shape, :numel, :dtype)", tensors)
            self._con.execute("DELETE FROM act_modules")
            self._con.executemany("INSERT INTO act_modules VALUES (:idx, :name, :kind, :lo, :hi, :relu_family)",
                                  act_modules)

    def has_steps(self) -> bool:
        return self._con.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None

    def write(self, chunks: Iterable[tuple[str, np.ndarray, np.ndarray]], events: Iterable[tuple[int, str, dict]] = ()) -> None:
        """Write one flush as one transaction: (series, steps int64[n], data [n, width]) chunks and events."""
        rows = []
        for series, steps, data in chunks:
            if len(steps) == 0:
                continue
            data = data.reshape(len(steps), -1)
            dtype, codec, blob = encode_array(data)
            steps = np.asarray(steps, dtype="<i8")
            rows.append((series, int(steps[0]), int(steps[-1]), steps.tobytes(), dtype, data.shape[1], codec, blob))
        ev = [(int(s), k, _nonfinite_json.dumps(d)) for s, k, d in events]
        with self._con:
            self._con.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._con.executemany("INSERT INTO events(step, kind, data) VALUES (?, ?, ?)", ev)

    def set_meta(self, key: str, value: Any) -> None:
        with self._con:
            self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _nonfinite_json.dumps(value)))

    def close(self) -> None:
        self._con.close()


def open_store(run_dir: str | Path) -> sqlite3.Connection:
    """A read-only connection to a run's store, with clear errors for missing or corrupt stores."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise RunNotFoundError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise RunNotFoundError(f"{str(run_dir)!r} is not a directory; expected a run directory made by graddoctor.watch")
    path = store_path(run_dir)
    if not path.exists():
        raise RunNotFoundError(f"no run store in {str(run_dir)!r}: expected the file {STORE_NAME!r} written by graddoctor.watch")
    try:
        con = _connect(path, readonly=True)
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = {"meta", "tensors", "act_modules", "chunks", "events"} - tables
        version = None if missing else con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"{str(path)!r} is not a readable graddoctor store ({e})") from e
    if missing or version is None:
        raise CorruptStoreError(f"{str(path)!r} is not a graddoctor store: missing tables {sorted(missing)}")
    if json.loads(version[0]) != SCHEMA_VERSION:
        raise CorruptStoreError(f"{str(path)!r} has schema version {version[0]}; this graddoctor reads version {SCHEMA_VERSION}")
    return con


def read_series(con: sqlite3.Connection, series: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(steps int64[T], data [T, width]) for one series, in step order; data is None if never written."""
    rows = _chunks(con, series, "SELECT steps, dtype, width, codec, data FROM chunks WHERE series=? ORDER BY first_step")
    if not rows:
        return np.zeros(0, dtype=np.int64), None
    with _decoding(series):
        steps = np.concatenate([np.frombuffer(r[0], dtype="<i8") for r in rows])
        data = np.concatenate([decode_array(r[1], r[3], r[2], r[4]) for r in rows])
    if len(steps) != len(data):
        raise CorruptStoreError(f"series {series!r} in the run store has {len(steps)} steps but {len(data)} rows")
    return steps, data


def read_last_row(con: sqlite3.Connection, series: str) -> Optional[np.ndarray]:
    """The last recorded row of a series, decoding only its newest chunk (None if never written)."""
    rows = _chunks(con, series, "SELECT dtype, codec, width, data FROM chunks WHERE series=? "
                                "ORDER BY first_step DESC LIMIT 1")
    if not rows:
        return None
    with _decoding(series):
        data = decode_array(*rows[0])
    return data[-1] if len(data) else None


def _chunks(con: sqlite3.Connection, series: str, query: str) -> list[tuple]:
    try:
        return con.execute(query, (series,)).fetchall()
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"cannot read series {series!r} from the run store ({e})") from e


@contextmanager
def _decoding(series: str) -> Iterator[None]:
    """Turn a failure to decode a chunk (a blob cut short or overwritten) into an error naming the series."""
    try:
        yield
    except (ValueError, TypeError, zlib.error) as e:
        raise CorruptStoreError(f"series {series!r} in the run store cannot be decoded ({e})") from e
