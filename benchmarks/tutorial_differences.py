"""By how much this project's PASCAL samples differ from the tutorial's: labels, pixels, SBD.

    python -m benchmarks.tutorial_differences --synthetic 200
    python -m benchmarks.tutorial_differences --voc-dir data/voc --split val
    python -m benchmarks.tutorial_differences --voc-dir data/voc --sbd-dir data/sbd --split train

Over the images of one VOC 2012 split, the tutorial's sample (benchmarks.loader.tutorial_sample:
ToTensor -> Normalize -> bicubic F.interpolate on float; labels from the mask resized to S x S
with PIL NEAREST) against this project's (PascalVOC2012: uint8 antialiased resize, then /255
and Normalize as the loop does on the device; labels from the full-resolution mask).

Printed: the images whose label vector changes and the classes the resize erases; the mean,
99th percentile (from a histogram: to 0.001 normalized units, 0.05 grey levels, rounded up)
and maximum of |tutorial - ours| over all values of the float32 [3, S, S] ImageNet-normalized
inputs, also in 0-255 grey levels (times std * 255 per channel); with --sbd-dir, how many of
VOC train + SBD train_noval are one image twice (the tutorial concatenates both lists, this
project keeps one entry per image id). --synthetic N writes a temporary VOC tree whose
--split holds N images (load_dataset/generators/make_synthetic_voc.py). Exit codes: 0 done, 2 a user
error such as a missing data folder.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import add_source_flags, check_source_flags, run_in_temporary_folder
from benchmarks.loader import machine_line, tutorial_sample
from load_dataset.custom_pascal import PascalVOC2012, merge_by_id, read_mask
from load_dataset.generators.make_synthetic_voc import write_synthetic_voc
from load_dataset.pascal.labels import VOC_CLASSES, label_vector_from_mask
from load_dataset.pascal.layout import find_sbd_root, find_voc_root, sbd_entries, voc_entries
from src.errors import DataError


def label_changes(mask: np.ndarray, size: int) -> tuple[list[int], list[int]]:
    """Class indices (0..19) lost and gained when the labels come from the mask resized to
    size x size with PIL NEAREST (the tutorial) instead of the full-resolution mask [H, W]."""
    full = label_vector_from_mask(mask) > 0
    small = np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST))
    resized = label_vector_from_mask(small) > 0
    return np.flatnonzero(full & ~resized).tolist(), np.flatnonzero(resized & ~full).tolist()


class AbsDiffStats:
    """Mean, percentiles and maximum of |values| over every array added, kept as a histogram
    (keeping VOC val's 1,449 x 307,200 values would take 1.8 GB)."""

    def __init__(self, bin_width: float, top: float) -> None:
        self.bin_width = bin_width
        self.counts = np.zeros(int(round(top / bin_width)) + 1, dtype=np.int64)
        self.total, self.n, self.max = 0.0, 0, 0.0

    def add(self, values: np.ndarray) -> None:
        a = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        bins = np.minimum((a / self.bin_width).astype(np.int64), len(self.counts) - 1)
        self.counts += np.bincount(bins, minlength=len(self.counts))
        self.total += float(a.sum())
        self.n += a.size
        self.max = max(self.max, float(a.max(initial=0.0)))

    def mean(self) -> float:
        return self.total / self.n

    def percentile(self, q: float) -> float:
        """The upper edge of the bin holding the q-th percentile (a bound within one bin)."""
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100 * self.n))
        return (k + 1) * self.bin_width


def compare_split(dataset: PascalVOC2012, size: int) -> tuple[dict, AbsDiffStats, AbsDiffStats]:
    """Label and pixel differences over every image of a PascalVOC2012 (augment 'none')."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(3, 1, 1) for v in dataset.mean_std)
    grey_per_unit = (std * 255).numpy()
    normalized, grey = AbsDiffStats(1e-3, 20.0), AbsDiffStats(0.05, 1024.0)
    labels = {"differ": 0, "present": 0, "gained": 0, "lost": Counter()}
    for i, entry in enumerate(dataset.entries):
        theirs, _ = tutorial_sample(entry.image_path, entry.mask_path, size)
        ours = (dataset[i]["data"].float().div(255) - mean) / std
        diff = (theirs - ours).numpy()
        normalized.add(diff)
        grey.add(diff * grey_per_unit)
        mask = read_mask(entry.mask_path)
        lost, gained = label_changes(mask, size)
        labels["present"] += int(dataset.labels[i].sum())
        labels["differ"] += bool(lost or gained)
        labels["gained"] += len(gained)
        labels["lost"].update(lost)
    return labels, normalized, grey


def sbd_duplicates(voc_dir: str, sbd_dir: str) -> tuple[int, int, int]:
    """(entries, unique image ids, duplicates) of VOC 2012 train + SBD train_noval."""
    voc = voc_entries(find_voc_root(voc_dir), "train")
    sbd = sbd_entries(find_sbd_root(sbd_dir))
    merged, dropped = merge_by_id(voc, sbd)
    return len(voc) + len(sbd), len(merged), dropped


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def format_report(
    labels: dict,
    n_images: int,
    normalized: AbsDiffStats,
    grey: AbsDiffStats,
    sbd: tuple[int, int, int] | None,
) -> list[str]:
    lost = labels["lost"]
    n_lost = sum(lost.values())
    often = ", ".join(f"{VOC_CLASSES[k]} {n}" for k, n in lost.most_common(5)) or "none"
    row = "{:<8} {:<36} {}".format
    lines = [
        row("labels", "images with another label vector", f"{labels['differ']} / {n_images}")
        + f" ({percent(labels['differ'], n_images)})",
        row("", "class labels lost by the resize", f"{n_lost} of {labels['present']} present")
        + f" ({percent(n_lost, labels['present'])}); gained {labels['gained']}",
        row("", "most often lost", often),
        "",
        row("pixels", "|tutorial - ours|", f"{'normalized':>12} {'grey levels':>12}"),
    ]
    for name, a, b in (
        ("mean", normalized.mean(), grey.mean()),
        ("99th percentile", normalized.percentile(99), grey.percentile(99)),
        ("max", normalized.max, grey.max),
    ):
        lines.append(row("", name, f"{a:>12.4f} {b:>12.2f}"))
    lines.append("")
    if sbd is None:
        lines.append(row("SBD", "duplicates", "not measured (no --sbd-dir)"))
    else:
        entries, unique, dupes = sbd
        lines += [
            row("SBD", "VOC train + SBD train_noval", f"{entries} entries"),
            row("", "unique image ids", unique),
            row("", "duplicates", f"{dupes} ({percent(dupes, entries)} of the entries; ")
            + "the tutorial trains on them twice, this project once)",
        ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tutorial_differences",
        description="By how much this project's PASCAL labels and inputs differ from the "
        "tutorial's.",
    )
    add_source_flags(parser, default_split="val")
    args = parser.parse_args(argv)
    check_source_flags(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_in_temporary_folder(run, parse_args(argv), "tutorial_differences_")


def run(args: argparse.Namespace, tmp: Path) -> int:
    """The comparison with parsed arguments; `tmp` holds the synthetic tree."""
    if args.synthetic is not None:
        n_train, n_val = (args.synthetic, 1) if args.split == "train" else (1, args.synthetic)
        voc_dir = write_synthetic_voc(tmp / "voc", n_train, n_val)
        source = f"synthetic {args.synthetic} (load_dataset/generators/make_synthetic_voc.py)"
    else:
        voc_dir = Path(args.voc_dir)
        source = args.voc_dir
    # VOC alone: SBD images are only counted for duplicates, below.
    dataset = PascalVOC2012(
        args.split, voc_dir, image_size=args.image_size, augment="none", return_seglabel=False
    )
    if len(dataset) == 0:
        raise DataError(f"The {args.split} split of {source} lists no images.")
    sbd = sbd_duplicates(args.voc_dir, args.sbd_dir) if args.sbd_dir else None
    labels, normalized, grey = compare_split(dataset, args.image_size)

    print(f"machine: {machine_line()}")
    print(
        f"data: {source}; VOC 2012 {args.split}, {len(dataset)} images compared at "
        f"{args.image_size} x {args.image_size}"
    )
    print()
    print("\n".join(format_report(labels, len(dataset), normalized, grey, sbd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
