"""A dataset whose samples draw from the global torch random state, as a random augmentation
in the main process (num_workers = 0) does: a resume that does not restore that state trains
on other samples than an uninterrupted run."""

from __future__ import annotations

import torch

from load_dataset.custom_tiny import TinyData


class NoisyTinyData(TinyData):
    """TinyData plus Gaussian pixel noise (std `noise`) drawn per sample in the training split."""

    def __init__(self, setname: str, noise: float = 0.5, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.noise = noise if setname == "train" else 0.0

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        if self.noise:
            sample["data"] = sample["data"] + self.noise * torch.randn_like(sample["data"])
        return sample
