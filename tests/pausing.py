"""A run that holds still at a known training step, so a test can signal, kill or race it there
instead of guessing with a clock how far it has got.

`PausingTinyConv` is TinyConv, named by import path in a config as a fork would name its own
model. With the environment variable PAUSE_AT set to N in the run's process, the process's N-th
training step prints `PAUSED` and waits (a signal ends the wait; the test kills the process
or stops it there), ten minutes at most, or until the file that RELEASE names exists. An
environment variable, not a model argument: the resumed run must have the same config, and must
not pause (unless the test says so in its environment).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import torch

from models.custom_models_base import TinyConv

PAUSE_AT = "PAUSING_TINYCONV_PAUSE_AT"
RELEASE = "PAUSING_TINYCONV_RELEASE"  # a file path: the pause ends once that file exists
PAUSED = "paused at training step"
# The process's training steps so far, over every model it builds (a --seeds group builds one
# per seed).
_steps = 0


class PausingTinyConv(TinyConv):
    """TinyConv whose process pauses at its PAUSE_AT-th training step (counting from 1 over
    every PausingTinyConv of the process): `paused at training step N` on stdout, then a wait
    of ten minutes at most, or until the file RELEASE names exists."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        global _steps
        if self.training:
            _steps += 1
            if str(_steps) == os.environ.get(PAUSE_AT):
                print(f"{PAUSED} {_steps}", flush=True)
                # The test signals or kills the process in here, or lets it go on (RELEASE).
                release, deadline = os.environ.get(RELEASE), time.monotonic() + 600
                while time.monotonic() < deadline and not (release and os.path.exists(release)):
                    time.sleep(0.05)
        return super().forward(x)


def wait_until_paused(proc: subprocess.Popen, limit_s: float = 600) -> str:
    """Read `proc`'s stdout (a text pipe) until it says it paused; return what it printed.

    An event, not a clock: however slow the machine, the process is at its pause when this
    returns. Only a process that never gets there is killed after `limit_s`, and the test
    fails with its output."""
    timer = threading.Timer(limit_s, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(PAUSED):
                return "".join(lines)
    finally:
        timer.cancel()
    proc.wait()
    raise AssertionError(
        f"the run ended (exit code {proc.returncode}) before it paused\n--- stdout\n"
        + "".join(lines)
        + f"--- stderr\n{proc.stderr.read() if proc.stderr else ''}"
    )
