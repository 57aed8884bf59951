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

The series `watch` writes (names, widths, dtypes, sampling) are the table `SERIES` in
`graddoctor/store/_series.py`; `graddoctor.store._series.describe()` prints it.

Crash safety: each flush is one transaction; WAL with synchronous=NORMAL keeps
every committed flush through a killed process. Readers never block the writer.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional
from urllib.parse import quote

import numpy as np

from .._errors import ConfigError, CorruptStoreError, ResumeMismatchError, RunExistsError, RunNotFoundError
from . import _nonfinite_json
from ._lock import RunLock

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


def encode_array(data: np.ndarray) -> tuple[str, str, bytes]:
    """(dtype string, codec, bytes) for a 2-D array, little-endian."""
    dtype = data.dtype.newbyteorder("<").str
    raw = np.ascontiguousarray(data, dtype=dtype).tobytes()
    if dtype in _ZLIB_DTYPES:
        return dtype, "zlib", zlib.compress(raw, 1)
    return dtype, "raw", raw


def decode_array(dtype: str, codec: str, width: int, blob: bytes) -> np.ndarray:
    """The [n, width] array of one chunk; ValueError/TypeError/zlib.error for a chunk that is not one."""
    if codec not in ("raw", "zlib"):
        raise ValueError(f"codec {codec!r} is not allowed: expected 'raw' or 'zlib'")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width {width!r} is not allowed: expected an integer >= 1")
    if not isinstance(dtype, str) or np.dtype(dtype).kind not in "fiub":  # np.dtype raises TypeError for no type
        raise ValueError(f"dtype {dtype!r} is not allowed: expected an integer or float type such as '<f4'")
    raw = zlib.decompress(blob) if codec == "zlib" else blob
    return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(-1, width)


def _uri(path: Path) -> str:
    """A SQLite URI for a path: percent-encoded bytes, so '?', '#', '%' and non-UTF-8 names are safe."""
    return "file:" + quote(os.fsencode(path.absolute()))


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        return _connect_readonly(path)
    con = sqlite3.connect(_uri(path) + "?mode=rwc", uri=True, timeout=30.0, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes, so a run on a read-only filesystem or directory can be read.

    SQLite opens a WAL store read-only only if it can create the shared-memory file beside it,
    which a read-only directory forbids. A store with no write-ahead log to replay (a closed
    run: its last connection folded the log into the file and removed it) is then opened as
    immutable, which needs no such file. A store whose log still holds frames (a run killed
    mid-flight) must not be: immutable would ignore the frames, and the steps in them.
    """
    con = sqlite3.connect(_uri(path) + "?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy: this opens
        return con
    except sqlite3.OperationalError as e:
        con.close()
        wal = Path(str(path) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise CorruptStoreError(f"{str(path)!r} cannot be opened read-only ({e}): its write-ahead log "
                                    f"{wal.name!r} holds unreplayed steps and the directory is not writable; "
                                    "copy the run directory somewhere writable and read the copy") from e
        return sqlite3.connect(_uri(path) + "?immutable=1", uri=True, check_same_thread=False)


class RunWriter:
    """Writes one run's store. Only the recording rank (rank 0) creates one.

    Opening takes the run directory's writer lock and checks what the directory holds before it
    writes anything, so a refused writer leaves an existing run as it was. A run already in the
    directory is refused unless `overwrite` (replace it) or `resume` (continue it) is given.

    Writes never raise into the training loop: a flush that fails (disk full, I/O error) is
    kept, warned about once, and written with the next flush; `close()` says what, if anything,
    could not be written.

    Attributes:
      next_step: the step the run continues at (0 for a new run; after a resume, the step after
        the last recorded one, or the step given to `resume`).
      lost: after `close()`, (first_step, last_step, reason) of the steps that could not be written, or None.
    """

    def __init__(self, run_dir: str | Path, meta: dict[str, Any], tensors: list[dict], act_modules: list[dict],
                 *, overwrite: bool = False, resume: bool | int = False):
        self.run_dir = check_run_dir(run_dir)
        self.path = store_path(self.run_dir)
        self._lock = RunLock.acquire(self.run_dir)
        try:
            self._con = _connect_for_writing(self.path)
            self.next_step = _prepare(self._con, self.path, meta, tensors, act_modules, overwrite, resume)
        except BaseException:
            if getattr(self, "_con", None) is not None:
                self._con.close()
            self._lock.release()
            raise
        self._pending: list[tuple[list[tuple], list[tuple]]] = []  # flushes not yet written
        self.last_error: Optional[str] = None
        self.lost: Optional[tuple[int, int, str]] = None

    def write(self, chunks: Iterable[tuple[str, np.ndarray, np.ndarray]],
              events: Iterable[tuple[int, str, dict]] = ()) -> bool:
        """Write one flush, and any earlier ones that failed, as one transaction.

        Args:
          chunks: (series, steps int64[n], data [n, width]) host arrays.
          events: (step, kind, data dict) tuples.
        Returns:
          True if everything is written; False if the write failed (the reason is in
          `last_error`), in which case the flush is kept and retried at the next write.
        """
        rows = [_chunk_row(series, steps, data) for series, steps, data in chunks if len(steps)]
        ev = [(int(s), k, _nonfinite_json.dumps(d)) for s, k, d in events]
        if rows or ev:
            self._pending.append((rows, ev))
        if not self._pending:
            return True
        try:
            with self._con:
                for rows, ev in self._pending:
                    self._con.executemany("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    self._con.executemany("INSERT INTO events(step, kind, data) VALUES (?, ?, ?)", ev)
        except (sqlite3.Error, OSError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        self._pending = []
        self.last_error = None
        return True

    @property
    def pending_steps(self) -> Optional[tuple[int, int]]:
        """(first, last) step of the flushes not yet written, or None."""
        spans = [(r[1], r[2]) for rows, _ in self._pending for r in rows]
        spans += [(e[0], e[0]) for _, ev in self._pending for e in ev]
        return (min(s[0] for s in spans), max(s[1] for s in spans)) if spans else None

    def set_meta(self, key: str, value: Any) -> bool:
        """Set one metadata value; False (with `last_error`) if it could not be written."""
        try:
            with self._con:
                self._con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, _nonfinite_json.dumps(value)))
        except (sqlite3.Error, OSError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            return False
        return True

    def clear(self) -> None:
        """Delete every recorded step and event (the run is recorded again from step 0)."""
        with self._con:
            self._con.execute("DELETE FROM chunks")
            self._con.execute("DELETE FROM events")

    def close(self) -> None:
        """Write what is pending, mark the run closed, close the store and release the lock. Never raises
        for a failed write: `lost` then says which steps could not be written and why."""
        if self._con is None:
            return
        self.write([], [])
        span = self.pending_steps
        if span is not None:
            self.lost = (span[0], span[1], self.last_error or "unknown error")
        else:
            self.set_meta("closed_at", time.time())  # lets readers (graddoctor serve) tell a finished run
        try:
            self._con.close()
        except sqlite3.Error:
            pass
        self._con = None  # type: ignore[assignment]
        self._lock.release()


def run_dir_path(run_dir: str | Path) -> Path:
    """The run directory's name as a Path; a `ConfigError` for an empty name (Path("") is the current folder)."""
    if not isinstance(run_dir, (str, Path)) or str(run_dir).strip() == "":
        raise ConfigError(f"run_dir={run_dir!r} is not allowed: give a directory path "
                          "(or run_dir=None to record nothing)")
    return Path(run_dir)


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a Path, created if missing; a `ConfigError` for an empty name, a file, or
    a directory that cannot be created."""
    path = run_dir_path(run_dir)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir {str(path)!r} is a file, not a directory: give a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"run_dir {str(path)!r} cannot be created: {e.strerror or e}") from e
    return path


def _connect_for_writing(path: Path) -> sqlite3.Connection:
    try:
        return _connect(path, readonly=False)
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"{str(path)!r} cannot be opened for writing ({e}); it is left as it is: "
                                "remove it by hand, or choose another run_dir") from e


def _prepare(con: sqlite3.Connection, path: Path, meta: dict[str, Any], tensors: list[dict], act_modules: list[dict],
             overwrite: bool, resume: bool | int) -> int:
    """Check what the store holds, then (and only then) write the run's header. Returns the next step."""
    recorded = _recorded_span(con, path)
    if recorded is not None and not overwrite and resume is False:
        raise RunExistsError(f"run directory {str(path.parent)!r} already holds a recorded run (steps {recorded[0]}-"
                             f"{recorded[1]}); choose a new run_dir, pass resume=True to continue it, or "
                             "overwrite=True to replace it")
    next_step = 0
    if recorded is not None and resume is not False and not overwrite:
        _check_same_layout(con, path, tensors, act_modules)
        next_step = recorded[1] + 1 if resume is True else int(resume)
        if not 0 <= next_step <= recorded[1] + 1:
            raise ConfigError(f"resume={resume!r} is not allowed: this run has steps {recorded[0]}-{recorded[1]}; "
                              f"give resume=True, or a step in 0..{recorded[1] + 1}")
    header = {"schema_version": SCHEMA_VERSION, "created": time.time(), **meta}
    with con:
        con.executescript(_SCHEMA)  # executescript commits first; every table is IF NOT EXISTS
    with con:
        if next_step:
            header["created"] = _meta_value(con, "created", header["created"])
            header["resumed"] = [*_meta_value(con, "resumed", []), {"at": time.time(), "step": next_step}]
            _truncate(con, next_step)
        elif recorded is not None:  # overwrite
            con.execute("DELETE FROM chunks")
            con.execute("DELETE FROM events")
            con.execute("DELETE FROM meta")
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, _nonfinite_json.dumps(v)) for k, v in header.items()])
        con.execute("DELETE FROM meta WHERE key='closed_at'")  # a run recorded again is open again
        con.execute("DELETE FROM tensors")
        con.executemany("INSERT INTO tensors VALUES (:idx, :name, :module, :shape, :numel, :dtype)", tensors)
        con.execute("DELETE FROM act_modules")
        con.executemany("INSERT INTO act_modules VALUES (:idx, :name, :kind, :lo, :hi, :relu_family)", act_modules)
    return next_step


def _recorded_span(con: sqlite3.Connection, path: Path) -> Optional[tuple[int, int]]:
    """(first, last) recorded step of the store, or None if it holds no steps (or is new)."""
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "chunks" not in tables:
            return None
        first, last = con.execute("SELECT min(first_step), max(last_step) FROM chunks").fetchone()
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"{str(path)!r} is not a readable graddoctor store ({e}); it is left as it is") from e
    return None if first is None else (int(first), int(last))


def _check_same_layout(con: sqlite3.Connection, path: Path, tensors: list[dict], act_modules: list[dict]) -> None:
    """Refuse to resume a run whose parameter tensors or activation modules differ from the model's."""
    old = {r[0]: (json.loads(r[1]), r[2]) for r in con.execute("SELECT name, shape, dtype FROM tensors ORDER BY idx")}
    new = {t["name"]: (json.loads(t["shape"]), t["dtype"]) for t in tensors}
    problems = []
    if list(old) != list(new):
        added, removed = [n for n in new if n not in old], [n for n in old if n not in new]
        if added:
            problems.append(f"not in the recorded run: {added[:8]}")
        if removed:
            problems.append(f"recorded but not in the model: {removed[:8]}")
        if not added and not removed:
            problems.append("the same tensors in another order")
    changed = [f"{n} {old[n][1]}{old[n][0]} -> {new[n][1]}{new[n][0]}" for n in new if n in old and old[n] != new[n]]
    if changed:
        problems.append(f"changed shape or dtype: {changed[:8]}")
    old_acts = [r[0] for r in con.execute("SELECT name FROM act_modules ORDER BY idx")]
    new_acts = [a["name"] for a in act_modules]
    if old_acts != new_acts:
        problems.append(f"activation modules differ (recorded {old_acts[:8]}, model {new_acts[:8]})")
    if problems:
        raise ResumeMismatchError(f"cannot resume the run in {str(path.parent)!r}: the model's tensors differ from "
                                  f"the recorded ones: {'; '.join(problems)}. Resume with the same model, or "
                                  "record into a new run_dir")


def _truncate(con: sqlite3.Connection, next_step: int) -> None:
    """Drop every recorded step >= next_step (training resumed from an earlier checkpoint replays them)."""
    rows = con.execute("SELECT series, first_step, steps, dtype, width, codec, data FROM chunks WHERE last_step >= ?",
                       (next_step,)).fetchall()
    con.execute("DELETE FROM chunks WHERE last_step >= ?", (next_step,))
    for series, _, steps_blob, dtype, width, codec, blob in rows:
        steps = np.frombuffer(steps_blob, dtype="<i8")
        keep = steps < next_step
        if keep.any():
            con.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        _chunk_row(series, steps[keep], decode_array(dtype, codec, width, blob)[keep]))
    con.execute("DELETE FROM events WHERE step >= ?", (next_step,))


def _meta_value(con: sqlite3.Connection, key: str, default: Any) -> Any:
    row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return default if row is None else _nonfinite_json.loads(row[0])


def _chunk_row(series: str, steps: np.ndarray, data: np.ndarray) -> tuple:
    data = data.reshape(len(steps), -1)
    dtype, codec, blob = encode_array(data)
    steps = np.asarray(steps, dtype="<i8")
    return (series, int(steps[0]), int(steps[-1]), steps.tobytes(), dtype, data.shape[1], codec, blob)


# The columns of each table, in order, as `_SCHEMA` creates them; `open_store` checks them.
_COLUMNS = {
    "meta": ["key", "value"],
    "tensors": ["idx", "name", "module", "shape", "numel", "dtype"],
    "act_modules": ["idx", "name", "kind", "lo", "hi", "relu_family"],
    "chunks": ["series", "first_step", "last_step", "steps", "dtype", "width", "codec", "data"],
    "events": ["id", "step", "kind", "data"],
}


def open_store(run_dir: str | Path) -> sqlite3.Connection:
    """A read-only connection to a run's store, with clear errors for missing or corrupt stores.

    Raises RunNotFoundError (no such directory, no store in it, a path the system cannot look up)
    or CorruptStoreError (not SQLite, missing tables or columns, another schema version), naming the path.
    """
    if str(run_dir) == "":  # Path("") would be the current directory
        raise RunNotFoundError("run directory '' is not allowed: "
                               "give the path of a run directory made by graddoctor.watch")
    run_dir = Path(run_dir)
    try:
        os.stat(run_dir)
    except FileNotFoundError:
        raise RunNotFoundError(f"run directory {str(run_dir)!r} does not exist") from None
    except (OSError, ValueError) as e:  # a name too long, a file where a folder should be, a NUL byte
        raise RunNotFoundError(f"run directory {str(run_dir)!r} cannot be read: "
                               f"{getattr(e, 'strerror', None) or e}") from e
    if not os.path.isdir(run_dir):
        raise RunNotFoundError(f"{str(run_dir)!r} is not a directory; "
                               "expected a run directory made by graddoctor.watch")
    path = store_path(run_dir)
    if not os.path.lexists(path):
        raise RunNotFoundError(f"no run store in {str(run_dir)!r}: "
                               f"expected the file {STORE_NAME!r} written by graddoctor.watch")
    try:
        con = _connect(path, readonly=True)
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"{str(path)!r} is not a readable graddoctor store ({e})") from e
    try:
        _check_schema(con, path)
    except BaseException:
        con.close()
        raise
    return con


def _check_schema(con: sqlite3.Connection, path: Path) -> None:
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        missing = sorted(set(_COLUMNS) - tables)
        if missing:
            raise CorruptStoreError(f"{str(path)!r} is not a graddoctor store: missing tables {missing}")
        for table, expected in _COLUMNS.items():
            columns = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            if columns != expected:
                raise CorruptStoreError(f"{str(path)!r} is not a graddoctor store: table {table!r} has columns "
                                        f"{columns}; expected {expected}")
        row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"{str(path)!r} is not a readable graddoctor store ({e})") from e
    if row is None:
        raise CorruptStoreError(f"{str(path)!r} is not a graddoctor store: its meta table has no schema_version")
    try:
        version = json.loads(row[0])
    except (TypeError, ValueError):
        version = None
    if version != SCHEMA_VERSION:
        raise CorruptStoreError(f"{str(path)!r} has schema version {str(row[0])[:40]}; this graddoctor reads "
                                f"version {SCHEMA_VERSION}")


def read_series(con: sqlite3.Connection, series: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(steps int64[T], data [T, width]) for one series, in step order; data is None if never written."""
    rows = _chunks(con, series,
                   "SELECT steps, dtype, width, codec, data FROM chunks WHERE series=? ORDER BY first_step")
    if not rows:
        return np.zeros(0, dtype=np.int64), None
    widths = {r[2] for r in rows}
    if len(widths) > 1:
        raise CorruptStoreError(f"series {series!r} in {_store_name(con)} has chunks of different widths "
                                f"{sorted(widths, key=str)}")
    with _decoding(con, series):
        steps = np.concatenate([np.frombuffer(r[0], dtype="<i8") for r in rows])
        data = np.concatenate([decode_array(r[1], r[3], r[2], r[4]) for r in rows])
    if len(steps) != len(data):
        raise CorruptStoreError(f"series {series!r} in {_store_name(con)} has {len(steps)} steps but {len(data)} rows")
    return steps, data


def read_last_row(con: sqlite3.Connection, series: str) -> Optional[np.ndarray]:
    """The last recorded row of a series, decoding only its newest chunk (None if never written)."""
    rows = _chunks(con, series, "SELECT dtype, codec, width, data FROM chunks WHERE series=? "
                                "ORDER BY first_step DESC LIMIT 1")
    if not rows:
        return None
    with _decoding(con, series):
        data = decode_array(*rows[0])
    return data[-1] if len(data) else None


def _chunks(con: sqlite3.Connection, series: str, query: str) -> list[tuple]:
    try:
        return con.execute(query, (series,)).fetchall()
    except sqlite3.DatabaseError as e:
        raise CorruptStoreError(f"cannot read series {series!r} from {_store_name(con)} ({e})") from e


@contextmanager
def _decoding(con: sqlite3.Connection, series: str) -> Iterator[None]:
    """Turn a failure to decode a chunk (a blob cut short or overwritten) into an error naming the series."""
    try:
        yield
    except (ValueError, TypeError, zlib.error) as e:
        raise CorruptStoreError(f"series {series!r} in {_store_name(con)} cannot be decoded ({e})") from e


def _store_name(con: sqlite3.Connection) -> str:
    """'the run store /path/graddoctor.sqlite', for an error message."""
    try:
        return f"the run store {con.execute('PRAGMA database_list').fetchone()[2]!r}"
    except (sqlite3.Error, TypeError, IndexError):
        return "the run store"
