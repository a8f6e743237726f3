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

# signal -> the handler Python starts with
SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class Preempted(KeyboardInterrupt):
    """SIGTERM: a scheduler, a spot instance's shutdown or `kill` ended the run."""


def signal_of(e: KeyboardInterrupt) -> int:
    """The signal an interrupt stands for: SIGTERM for `Preempted`, else SIGINT."""
    return signal.SIGTERM if isinstance(e, Preempted) else signal.SIGINT


def exit_code(e: KeyboardInterrupt) -> int:
    return 128 + signal_of(e)


def interrupt_of(signum: int) -> KeyboardInterrupt:
    """The exception signal `signum` raises: `Preempted` for SIGTERM, else KeyboardInterrupt."""
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
        raise interrupt_of(signum)


@contextmanager
def held() -> Iterator[bool]:
    """The handlers in for the block, where the program has not set its own; whether they
    are (signal handlers belong to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    if not _State.holders:
        for signum, python_default in SIGNALS.items():
            # Ctrl-C ignored (a background job of a non-interactive shell) stays ignored.
            if signal.getsignal(signum) is python_default:
                _State.installed[signum] = signal.signal(signum, _on_signal)
        _State.pending = None
    _State.holders += 1
    try:
        yield True
    finally:
        _State.holders -= 1
        if not _State.holders:
            for signum, before in _State.installed.items():
                if signal.getsignal(signum) is _on_signal:
                    signal.signal(signum, before)
            _State.installed = {}


def stop_of(e: BaseException | None = None) -> KeyboardInterrupt | None:
    """The interrupt that ended a run with `e`, or None: `e` itself for Ctrl-C or SIGTERM, or
    a signal received while held (also one Python lost; under torchrun the rank whose peer
    stopped first fails in its collective call instead)."""
    if isinstance(e, KeyboardInterrupt):
        return e
    return interrupt_of(_State.pending) if _State.holders and _State.pending is not None else None


@contextmanager
def mlflow_call(interruptible: bool = True) -> Iterator[None]:
    """A signal waits for the call; `interruptible`: raise one received before or during it.
    Only the main thread's calls count: a signal's exception is raised there, so a call of
    another thread (a background thread's) is never cut, and must not hold the signal back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if interruptible and (stop := stop_of()) is not None:
        raise stop
    _State.in_mlflow_call += 1
    try:
        yield
    finally:
        _State.in_mlflow_call -= 1
    if interruptible and (stop := stop_of()) is not None:
        raise stop
