"""Flush and close open watches on the way out: normal exit, Ctrl-C, SIGTERM.

- Normal exit, an uncaught exception and Ctrl-C (KeyboardInterrupt) run `atexit`, which closes
  every watch still open.
- SIGTERM (what `kill`, schedulers and preemption send) ends a process without `atexit` when
  nobody handles it. If SIGTERM has its default action when the first watch opens, graddoctor
  installs a handler that closes the open watches and then ends the process with SIGTERM as
  before (same exit status). A handler the user installed is never replaced: it runs as it is
  (if it exits with `sys.exit`, `atexit` closes the watches). An ignored SIGTERM stays ignored.
- A signal that arrives while a watch is writing a flush waits for that write to finish, so the
  flush is not cut in half; the step being recorded when it arrives is not written.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

_open: "weakref.WeakSet[Any]" = weakref.WeakSet()  # watches with a close() still to run
_state = {"installed": False, "writing": 0, "deferred": False}


def register(watch: Any) -> None:
    """Close `watch` on the way out (it leaves the registry when closed, or when garbage-collected)."""
    _open.add(watch)
    if not _state["installed"]:
        _state["installed"] = True
        atexit.register(close_all)
        _install_sigterm()


def unregister(watch: Any) -> None:
    _open.discard(watch)


def close_all() -> None:
    """Close every open watch; one that fails is reported in a line and does not stop the others."""
    for watch in list(_open):
        try:
            watch.close()
        except Exception as e:  # on the way out a traceback helps nobody: say what failed and go on
            _open.discard(watch)
            print(f"graddoctor: could not close the run in {str(watch.run_dir)!r} on exit: {type(e).__name__}: {e}",
                  file=sys.stderr)


@contextmanager
def writing() -> Iterator[None]:
    """Hold a SIGTERM that arrives inside this block until the block is done (a flush's write)."""
    _state["writing"] += 1
    try:
        yield
    finally:
        _state["writing"] -= 1
        if _state["deferred"] and not _state["writing"]:
            _state["deferred"] = False
            _terminate()


def _install_sigterm() -> None:
    # signal handlers can only be set from the main thread; elsewhere atexit alone must do.
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum: int, frame: Any) -> None:
    if _state["writing"]:
        _state["deferred"] = True
        return
    _terminate()


def _terminate() -> None:
    """Close every open watch, then die of SIGTERM as the default action would have."""
    try:
        close_all()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
