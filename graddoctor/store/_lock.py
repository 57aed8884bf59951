"""One writer per run directory: an advisory lock file beside the run store.

The lock is `flock` on `graddoctor.lock` in the run directory. The kernel drops it when its
holder's file is closed or its process dies (SIGKILL included), so a lock left by a killed
run never blocks: the next watcher simply takes it. While held, the file names its holder
(pid, host, start time), so a refused watcher can say who holds the run.

`flock` locks belong to an open file, not to a process, so a second watcher in the same
process is refused too. On platforms without `fcntl` (Windows) no lock is taken.
Network filesystems may not honour `flock`; there two hosts are not kept apart.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .._errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer per directory is then the user's care
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "graddoctor.lock"


class RunLock:
    """The held lock of one run directory. `release()` gives it back (safe to call twice)."""

    def __init__(self, path: Path, fd: Optional[int]):
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Take the run directory's writer lock, or raise `RunLockedError` naming its holder."""
        path = run_dir / LOCK_NAME
        if fcntl is None:
            return cls(path, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"run directory {str(run_dir)!r} is being written by another watcher "
                                     f"({holder}); close that watcher first, or choose another run_dir") from None
            # A releasing holder unlinks the file after unlocking it: if the name now points at a
            # newer file (or none), our lock is on a dead inode, so take the lock again.
            if _same_file(fd, path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so nobody takes a lock on a file about to vanish
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    """'pid 123 on host h since 12:00:01' from the lock file, or a plain phrase if it cannot be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a watcher that is still starting"
