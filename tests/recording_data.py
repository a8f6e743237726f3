"""A dataset that writes down the batches the training loop draws from it, named by import path
in a config as a fork would name its own: what the README promises about batches (a new shuffle
each epoch, seeded, the same on resume, the last partial batch dropped) is read from its file."""

from __future__ import annotations

from pathlib import Path

from load_dataset.custom_tiny import TinyData


class RecordingTinyData(TinyData):
    """TinyData that appends one line per batch a DataLoader asks it for to `batches_path`:
    the split, then the batch's sample indices in the order the loader gave them.

    A DataLoader fetches a whole batch through `__getitems__`; single samples (the dataset
    contract's look at the first one) go through `__getitem__` and are not written down. With
    `num_workers = 0` the lines are in the order the loop draws the batches.
    """

    def __init__(self, setname: str, batches_path: str = "", **kwargs) -> None:
        super().__init__(setname, **kwargs)
        self.batches_path = Path(batches_path)

    def __getitems__(self, indices: list[int]) -> list[dict]:
        with self.batches_path.open("a") as f:
            f.write(" ".join([self.setname, *map(str, indices)]) + "\n")
        return [self[i] for i in indices]


def read_batches(path: Path, split: str = "train") -> list[list[int]]:
    """The batches of `split` written to `path`, in the order they were drawn."""
    if not path.is_file():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [[int(i) for i in line[1:]] for line in lines if line[0] == split]
