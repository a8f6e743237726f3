"""Small TinyData-format folders written into a test's tmp directory.

root/
    tiny_labels.csv   header ("Filename", *label_names), one row per image
    train/ val/ test/ solid-colour PNGs
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

TINY_LABELS = ("LabelRed", "LabelBlue", "LabelYellow")


def write_png(path: Path, pixels: np.ndarray | Sequence, mode: str = "RGB") -> Path:
    """Writes `pixels` (uint8 [H, W, 3] for RGB, [H, W] for L) as a PNG; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode).save(path)
    return path


def solid_colour(i: int) -> tuple[int, int, int]:
    """A colour that differs for every i < 256, so images of a folder can be told apart."""
    return (i * 37 % 256, i * 91 % 256, 255 - i % 256)


def write_labels_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Writes a label CSV exactly as given (cells as text), so tests can write bad ones too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([[str(cell) for cell in row] for row in rows])
    return path


def write_tiny_folder(
    root: Path,
    splits: Mapping[str, Mapping[str, Sequence[int]]],
    label_names: Sequence[str] = TINY_LABELS,
    size: int = 32,
) -> Path:
    """A TinyData folder: `splits` maps split -> {file name: labels}; returns `root`.

    Image j (counting over all splits in the given order) is a solid `solid_colour(j)`
    square of `size` pixels. The CSV lists every image once, in the given order.
    """
    rows = []
    j = 0
    for split, images in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, labels in images.items():
            write_png(root / split / name, np.full((size, size, 3), solid_colour(j)))
            rows.append([name, *labels])
            j += 1
    write_labels_csv(root / "tiny_labels.csv", ["Filename", *label_names], rows)
    return root


def small_tiny_folder(root: Path) -> Path:
    """Two train, one val and one test image with the shipped data's three label columns."""
    return write_tiny_folder(
        root,
        {
            "train": {"b.png": (0, 1, 0), "a.png": (1, 0, 1)},
            "val": {"c.png": (0, 0, 0)},
            "test": {"d.png": (1, 1, 1)},
        },
    )
