"""Ctrl-C (SIGINT) and pre-emption (SIGTERM): a run stops at a safe point and says how to resume.

SLURM, Kubernetes and spot instances end a job with SIGTERM (then SIGKILL after a grace
period). While a run is held, both signals raise `KeyboardInterrupt` in the main thread
(SIGTERM: its subclass `Preempted`), as Python does for Ctrl-C by default, with two
differences. A signal that arrives during an MLflow write is raised when the write returns:
a write cut in half keeps the SQLite store locked, and marking the run KILLED then fails. A
signal whose exception Python loses, because it arrived while a finalizer ran (a `__del__`
or weakref callback, e.g. SQLAlchemy's; CPython prints "Exception ignored in ..."), is
remembered and raised again at the next held call.

The exception unwinds the training loop in the middle of its batch (checkpoints are replaced
atomically, so `last.pt` stays the last complete epoch), the run is marked KILLED, the
DataLoader's workers are shut down as the loop's iterator goes, and the command exits with
`exit_code(e)`: 130 for Ctrl-C, 143 for SIGTERM (128 + the signal number, what a shell and a
scheduler read as "terminated by SIGTERM").
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Preempted(KeyboardInterrupt):
    """SIGTERM: a scheduler, a spot instance's shutdown or `kill` ended the run."""


def exit_code(e: KeyboardInterrupt) -> int:
    return 128 + (signal.SIGTERM if isinstance(e, Preempted) else signal.SIGINT)


def _interrupt(signum: int) -> KeyboardInterrupt:
    return Preempted() if signum == signal.SIGTERM else KeyboardInterrupt()


class _State:
    pending: int | None = None  # the first signal received since the handlers went in
    in_mlflow_call = 0
    holders = 0  # runs (and groups of runs) not yet ended
    installed: dict[int, Any] = {}  # signal -> the handler it had before


def _on_signal(signum: int, frame: Any) -> None:
    first = _State.pending is None
    if first:
        _State.pending = signum
    if not (first and _State.in_mlflow_call):
        raise _interrupt(signum)


def _python_default(signum: int) -> Any:
    return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL


def hold() -> bool:
    """Put the handlers in, where the program has not set its own (main thread only)."""
    if not _State.holders:
        if threading.current_thread() is not threading.main_thread():
            return False
        for signum in SIGNALS:
            # Ctrl-C ignored (a background job of a non-interactive shell) stays ignored.
            if signal.getsignal(signum) is _python_default(signum):
                _State.installed[signum] = signal.signal(signum, _on_signal)
        _State.pending = None
    _State.holders += 1
    return True


def release() -> None:
    _State.holders -= 1
    if _State.holders:
        return
    for signum, before in _State.installed.items():
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, before)
    _State.installed = {}


@contextmanager
def held() -> Iterator[None]:
    holds = hold()
    try:
        yield
    finally:
        if holds:
            release()


def received() -> KeyboardInterrupt | None:
    """The interrupt for a signal received while held (also one Python lost), else None."""
    if _State.holders and _State.pending is not None:
        return _interrupt(_State.pending)
    return None


def stop_of(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt that ended a run with `e`, or None: `e` itself for Ctrl-C or SIGTERM, or
    a signal received meanwhile (under torchrun the rank whose peer stopped first fails in its
    collective call instead)."""
    return e if isinstance(e, KeyboardInterrupt) else received()


def raise_pending() -> None:
    stop = received()
    if stop is not None:
        raise stop


@contextmanager
def mlflow_call(interruptible: bool = True) -> Iterator[None]:
    """A signal waits for the call; `interruptible`: raise one received before or during it."""
    if interruptible:
        raise_pending()
    _State.in_mlflow_call += 1
    try:
        yield
    finally:
        _State.in_mlflow_call -= 1
    if interruptible:
        raise_pending()
