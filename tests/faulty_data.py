"""Datasets for failure tests, named by import path in a config as a fork would name its own."""

from __future__ import annotations

import time

import torch

from load_dataset.custom_tiny import TinyData


class SlowTinyData(TinyData):
    """TinyData that takes `delay_s` per sample, so a signal lands in the middle of an epoch."""

    def __init__(self, setname: str, delay_s: float = 0.01, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.delay_s = delay_s

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay_s)
        return super().__getitem__(i)


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
