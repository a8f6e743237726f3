"""src/interrupts.py with real signals sent to this process (the main thread takes them)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

import src.interrupts as interrupts


def test_a_signal_waits_for_the_main_threads_mlflow_call_then_is_raised():
    with interrupts.held():
        with pytest.raises(interrupts.Preempted):
            with interrupts.mlflow_call():
                os.kill(os.getpid(), signal.SIGTERM)
                finished = True  # the call was not cut
        assert finished


def test_another_threads_mlflow_call_does_not_hold_back_the_main_threads_signal():
    """A background thread in the middle of an MLflow call while SIGTERM arrives: the main
    thread is stopped at once (and the other thread is not)."""
    inside, release, outcome = threading.Event(), threading.Event(), []

    def background() -> None:
        try:
            with interrupts.mlflow_call():
                inside.set()
                release.wait(10)
            outcome.append("finished")
        except BaseException as e:
            outcome.append(type(e).__name__)

    with interrupts.held():
        thread = threading.Thread(target=background)
        thread.start()
        try:
            assert inside.wait(10)
            with pytest.raises(interrupts.Preempted):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # the handler runs between these bytecodes
                    threading.Event().wait(0.01)
        finally:
            release.set()
            thread.join(10)
    assert outcome == ["finished"]
