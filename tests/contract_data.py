"""Datasets that break (or bend) the dataset contract, named by import path in a config as a
fork would name its own."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from load_dataset.custom_tiny import TinyData


class NoMeaningsTinyData(TinyData):
    """TinyData that forgot `label_meanings`."""

    def __init__(self, setname: str, **kwargs) -> None:
        super().__init__(setname, **kwargs)
        del self.label_meanings


class Uint8TinyData(TinyData):
    """TinyData returning uint8 images without saying which mean/std to apply."""

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        sample["data"] = (sample["data"] * 50 + 128).clamp(0, 255).to(torch.uint8)
        return sample


class IntClassTinyData(TinyData):
    """TinyData giving the index of its first positive label as an int class, no img_idx."""

    def __getitem__(self, i: int) -> dict:
        sample = super().__getitem__(i)
        return {"data": sample["data"], "label": int(sample["label"].argmax())}


class TupleTinyData(TinyData):
    """TinyData in torchvision's convention: (image, multi-hot target)."""

    def __getitem__(self, i: int) -> tuple:
        sample = super().__getitem__(i)
        return sample["data"], sample["label"]


class ListDataset(Dataset):
    """A fixed list of samples, with optional attributes; for unit tests of the contract."""

    def __init__(self, samples: list, **attributes) -> None:
        self.samples = samples
        for key, value in attributes.items():
            setattr(self, key, value)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]
