"""Datasets for failure tests, named by import path in a config as a fork would name its own."""

from __future__ import annotations

import os
import signal
import time

import torch

from load_dataset.custom_tiny import TinyData

# SlowTinyData presses Ctrl-C inside a finalizer at this training read when it is set.
CTRL_C_IN_FINALIZER_AT = "FAULTY_DATA_CTRL_C_IN_FINALIZER_AT"


class SlowTinyData(TinyData):
    """TinyData that takes `delay_s` per sample, so a signal lands in the middle of an epoch.

    With the environment variable CTRL_C_IN_FINALIZER_AT set to N (and num_workers = 0),
    its N-th training read presses Ctrl-C inside a finalizer, where CPython drops the
    KeyboardInterrupt ("Exception ignored in ..."), as when one of SQLAlchemy's finalizers
    runs at the moment Ctrl-C arrives. An environment variable, not a dataset argument:
    the resumed run must have the same config, and must not be interrupted.
    """

    def __init__(self, setname: str, delay_s: float = 0.01, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.delay_s = delay_s
        at = os.environ.get(CTRL_C_IN_FINALIZER_AT) if setname == "train" else None
        self.ctrl_c_at = int(at) if at else 0
        self.reads = 0

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay_s)
        self.reads += 1
        if self.reads == self.ctrl_c_at:
            _CtrlCWhenFinalized()  # dropped at once: its __del__ runs here
        return super().__getitem__(i)


class _CtrlCWhenFinalized:
    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)  # the SIGINT handler runs in this sleep, inside the finalizer


class NaNAfterTinyData(TinyData):
    """TinyData whose training images turn to NaN after `good_samples` reads (num_workers = 0)."""

    def __init__(self, setname: str, good_samples: int = 150, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.good_samples = good_samples
        self.reads = 0

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        self.reads += 1
        if self.reads > self.good_samples:
            sample["data"] = torch.full_like(sample["data"], float("nan"))
        return sample
