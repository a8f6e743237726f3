"""How fast PASCAL samples reach the model: the tutorial's pipeline against this project's.

    python -m benchmarks.loader --synthetic 200
    python -m benchmarks.loader --voc-dir data/voc --sbd-dir data/sbd --split train \
        --repeats 1
    python -m benchmarks.loader --synthetic 200 --cached --num-workers 0 1 2 \
        --batch-size 32

Stage 1, one core: the process is pinned to one CPU (where the OS allows) with
torch.set_num_threads(1), samples are iterated in-process, every pipeline reads the same files:

| pipeline | per image                                                                        |
| -------- | -------------------------------------------------------------------------------- |
| tutorial | decode -> ToTensor -> Normalize -> bicubic F.interpolate on float to S x S;       |
|          | labels by set(mask.tolist()) of the full-resolution mask                          |
| uncached | PascalVOC2012 as the training loop builds it (return_seglabel=False): decode,     |
|          | uint8 resize; construction (the label table: every mask read once) included      |
| cached   | PascalVOC2012 with cache_dir, the cache already built (its build time is printed  |
|          | apart); construction included                                                     |
| decode   | open_rgb + np.asarray: the floor of any pipeline that decodes                     |

Every pipeline reads an image as the datasets read it (`load_dataset.images.open_rgb`: for a
VOC JPEG, the tutorial's PIL open + convert("RGB")) and a mask with `read_mask`.
Each pipeline runs --repeats times, interleaved with the others, and its fastest pass counts.

Stage 2: a torch DataLoader (--batch-size, default 64) over the uncached dataset (--cached:
the cached one) for each value of --num-workers (default 0, 1, 2, 4, ... up to the usable
cores), reading the dataset --repeats times in one pass; the sustained rate (from the first
batch on) counts, and the fastest setting is recommended.

Printed: the machine, the table, and the ratios against this project's targets (uncached
>= 5x tutorial and >= 0.6x decode alone, cached >= 50x tutorial). Written to --out
(default results/benchmark_loader): results.csv and images_per_s.png. --synthetic N writes
a temporary VOC tree of N photo-sized JPEGs (load_dataset/generators/make_synthetic_voc.py)
and removes it afterwards. Exit codes: 0 done (a missed target is a figure, not a failure), 2 a user
error such as a missing data folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from matplotlib.figure import Figure
from PIL import features
from torch.utils.data import DataLoader
from torchvision import transforms

from benchmarks.common import add_source_flags, check_source_flags, run_in_temporary_folder
from load_dataset.custom_pascal import PascalVOC2012, read_mask
from load_dataset.generators.make_synthetic_voc import write_synthetic_voc
from load_dataset.images import open_rgb
from load_dataset.pascal.cache import usable_cores
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD
from src.config import REPO_ROOT
from src.errors import DataError

DEFAULT_OUT = REPO_ROOT / "results" / "benchmark_loader"
# (pipeline, reference, minimum ratio of their images/s)
TARGETS = (("uncached", "tutorial", 5.0), ("uncached", "decode", 0.6), ("cached", "tutorial", 50.0))
SINGLE_CORE = "1 core"
LOADER = "loader"


@dataclass
class Row:
    """One measurement: `images` samples in `seconds` (the fastest of the timed passes)."""

    stage: str  # SINGLE_CORE or LOADER
    pipeline: str  # tutorial, uncached, cached, decode
    num_workers: int | None  # DataLoader workers (stage 2 only)
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    @property
    def label(self) -> str:
        if self.num_workers is None:
            return f"{self.stage}: {self.pipeline}"
        return f"{self.stage}, {self.num_workers} workers: {self.pipeline}"


# ------------------------------------------------------------------ the pipelines


def tutorial_sample(image_path: str, mask_path: str, size: int) -> tuple[torch.Tensor, list[int]]:
    """The tutorial's sample: float32 [3, size, size] ImageNet-normalized, 20 labels of 0/1."""
    image = open_rgb(image_path)
    x = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(transforms.ToTensor()(image))
    x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    mask = read_mask(mask_path)  # SBD's .mat: the tutorial reads these through scipy as well
    present = set(mask.ravel().tolist())
    return x, [int(k in present) for k in range(1, 21)]


def decode_alone(image_path: str) -> np.ndarray:
    """uint8 [H, W, 3]: the JPEG decoded, nothing else."""
    return np.asarray(open_rgb(image_path))


@contextmanager
def one_core() -> Iterator[None]:
    """Pins this process to one CPU and torch to one thread; restores both afterwards."""
    threads = torch.get_num_threads()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    torch.set_num_threads(1)
    if affinity:
        os.sched_setaffinity(0, {max(affinity)})
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if affinity:
            os.sched_setaffinity(0, affinity)


def default_workers(cores: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to `cores` (and `cores` itself)."""
    values, n = [0], 1
    while n < cores:
        values.append(n)
        n *= 2
    return values + [cores]


def time_passes(passes: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The fastest of `repeats` runs of each pass, in seconds; the passes take turns."""
    best = {name: float("inf") for name in passes}
    for _ in range(repeats):
        for name, run_pass in passes.items():
            start = time.perf_counter()
            run_pass()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def single_core_rows(dataset_args: dict[str, Any], cache_dir: Path, repeats: int) -> list[Row]:
    """Stage 1: images/s of the four pipelines on one core, over the same files."""
    entries = PascalVOC2012(**dataset_args).entries
    size = dataset_args["image_size"]

    # Every sample is dropped at once, as a training loop would: keeping 5,953 float images
    # would take 7 GB.
    def iterate(dataset: PascalVOC2012) -> None:
        for i in range(len(dataset)):
            dataset[i]

    def tutorial() -> None:
        for e in entries:
            tutorial_sample(e.image_path, e.mask_path, size)

    def decode() -> None:
        for e in entries:
            decode_alone(e.image_path)

    passes = {
        "tutorial": tutorial,
        "uncached": lambda: iterate(PascalVOC2012(**dataset_args)),
        "cached": lambda: iterate(PascalVOC2012(**dataset_args, cache_dir=cache_dir)),
        "decode": decode,
    }
    with one_core():
        passes["decode"]()  # warm-up: files into the page cache, lazy imports done
        torch.manual_seed(0)  # augmentations, if any, draw the same in every run
        seconds = time_passes(passes, repeats)
    return [Row(SINGLE_CORE, name, None, len(entries), s) for name, s in seconds.items()]


def loader_rows(
    dataset: torch.utils.data.Dataset,
    pipeline: str,
    workers: list[int],
    batch_size: int,
    repeats: int,
) -> list[Row]:
    """Stage 2: sustained images/s of a DataLoader over `dataset` for each number of workers.

    One pass over the dataset `repeats` times in a row; the clock starts when the first
    batch arrives (worker start-up and filling the pipeline happen once per training, not
    per batch), unless that batch is the only one.
    """
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker: num_workers=0 then means one core too
    try:
        for n in workers:
            order = list(range(len(dataset))) * repeats
            loader = DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=n)
            start = time.perf_counter()
            batches = iter(loader)
            first = len(next(batches)["label"])
            if len(order) > first:
                start, images = time.perf_counter(), 0
            else:
                images = first
            for batch in batches:
                images += len(batch["label"])
            rows.append(Row(LOADER, pipeline, n, images, time.perf_counter() - start))
            del batches, loader  # stops the workers before the next setting starts its own
    finally:
        torch.set_num_threads(threads)
    return rows


# ------------------------------------------------------------------ reporting


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    turbo = "libjpeg-turbo" if features.check_feature("libjpeg_turbo") else "libjpeg"
    return (
        f"{cpu_model()}, {usable_cores()} usable cores; torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, Pillow {PIL.__version__} ({turbo})"
    )


def format_table(rows: list[Row], tutorial: float) -> str:
    head = f"{'stage':<8} {'pipeline':<9} {'workers':>7} {'images':>7} {'seconds':>8} "
    head += f"{'images/s':>9} {'x tutorial':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        workers = "-" if r.num_workers is None else str(r.num_workers)
        lines.append(
            f"{r.stage:<8} {r.pipeline:<9} {workers:>7} {r.images:>7} {r.seconds:>8.3f} "
            f"{r.images_per_s:>9.0f} {r.images_per_s / tutorial:>9.1f}x"
        )
    return "\n".join(lines)


def target_lines(speed: dict[str, float]) -> list[str]:
    lines = []
    for pipeline, reference, minimum in TARGETS:
        ratio = speed[pipeline] / speed[reference]
        verdict = "met" if ratio >= minimum else "MISSED"
        lines.append(
            f"  {pipeline} / {reference}: {ratio:6.2f}x  (target >= {minimum:g}x)  {verdict}"
        )
    return lines


def write_csv(rows: list[Row], tutorial: float, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["stage", "pipeline", "num_workers", "images", "seconds", "images_per_s", "x_tutorial"]
        )
        for r in rows:
            workers = "" if r.num_workers is None else r.num_workers
            ips = r.images_per_s
            writer.writerow(
                [r.stage, r.pipeline, workers, r.images, f"{r.seconds:.6f}", f"{ips:.1f}"]
                + [f"{ips / tutorial:.2f}"]
            )


def write_chart(rows: list[Row], title: str, path: Path) -> None:
    """A horizontal bar per row, images/s on a log axis (the pipelines differ ~100-fold)."""
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.4))
    ax = fig.subplots()
    labels = [r.label for r in rows][::-1]
    values = [r.images_per_s for r in rows][::-1]
    colours = ["tab:gray" if r.stage == LOADER else "tab:blue" for r in rows][::-1]
    bars = ax.barh(labels, values, color=colours)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("images per second (log scale)")
    ax.set_title(title, fontsize=9)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader",
        description="Images/s of the tutorial's PASCAL pipeline and of this project's.",
    )
    add_source_flags(parser, default_split="train")
    parser.add_argument("--augment", default="none", help="as data.args.augment (default none)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per pipeline")
    parser.add_argument("--num-workers", type=int, nargs="+", help="DataLoader workers to try")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cached", action="store_true", help="sweep workers over the cache")
    parser.add_argument("--cache-dir", help="keep the cache here (default: a temporary folder)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for CSV and chart")
    args = parser.parse_args(argv)
    check_source_flags(parser, args)
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats, --batch-size and --image-size must be at least 1")
    if args.num_workers is not None and min(args.num_workers) < 0:
        parser.error("--num-workers takes numbers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_in_temporary_folder(run, parse_args(argv), "benchmark_loader_")


def run(args: argparse.Namespace, tmp: Path) -> int:
    """The benchmark with parsed arguments; `tmp` holds the synthetic tree and the cache."""
    if args.synthetic is not None:
        start = time.perf_counter()
        voc_dir = write_synthetic_voc(tmp / "voc", args.synthetic)
        print(f"wrote {args.synthetic} synthetic photos in {time.perf_counter() - start:.1f} s")
        source = "synthetic"
    else:
        voc_dir = Path(args.voc_dir)
        source = args.voc_dir + (f" + {args.sbd_dir}" if args.sbd_dir else "")
    dataset_args = {"setname": args.split, "voc_dataset_dir": voc_dir}
    dataset_args |= {"sbd_dataset_dir": args.sbd_dir, "image_size": args.image_size}
    dataset_args |= {"augment": args.augment, "return_seglabel": False}
    uncached = PascalVOC2012(**dataset_args)  # a missing folder fails here, before any timing
    if len(uncached) == 0:
        raise DataError(f"The {args.split} split of {source} lists no images.")
    sizes = [os.path.getsize(e.image_path) for e in uncached.entries]
    cache_dir = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
    start = time.perf_counter()
    cached = PascalVOC2012(**dataset_args, cache_dir=cache_dir)
    build_s = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine_line()}")
    print(
        f"data: {source}; split {args.split}, {len(uncached)} images, JPEG mean "
        f"{np.mean(sizes) / 1e3:.0f} KB; image_size {args.image_size}; augment {args.augment}"
    )
    print(
        f"cache: {cached.cache.nbytes / 1e6:.1f} MB ({cached.cache.nbytes // len(cached):,} bytes "
        f"per image) in {cache_dir}; built (or checked) in {build_s:.2f} s on "
        f"{usable_cores()} cores, not counted below"
    )
    rows = single_core_rows(dataset_args, cache_dir, args.repeats)
    workers = args.num_workers or default_workers(usable_cores())
    dataset, pipeline = (cached, "cached") if args.cached else (uncached, "uncached")
    rows += loader_rows(dataset, pipeline, workers, args.batch_size, args.repeats)

    speed = {r.pipeline: r.images_per_s for r in rows if r.stage == SINGLE_CORE}
    print()
    print(format_table(rows, speed["tutorial"]))
    print()
    print("targets (1 core):")
    print("\n".join(target_lines(speed)))
    best = max((r for r in rows if r.stage == LOADER), key=lambda r: r.images_per_s)
    print(
        f"fastest loader: --num-workers {best.num_workers} "
        f"({best.images_per_s:,.0f} images/s, batch size {args.batch_size}, {pipeline})"
    )
    csv_path, png_path = out / "results.csv", out / "images_per_s.png"
    write_csv(rows, speed["tutorial"], csv_path)
    title = f"PASCAL loading: {len(uncached)} images ({source}) at {args.image_size} px\n"
    title += f"{cpu_model()}, {usable_cores()} usable cores"
    write_chart(rows, title, png_path)
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
