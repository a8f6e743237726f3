"""Image processing shared by the datasets: tensor conversion, normalization, split
statistics, atomic writes. Image files are read by `load_dataset.images`."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from load_dataset.errors import DataError
from load_dataset.images import open_rgb, to_rgb

# Per-channel statistics of ImageNet for images scaled to [0, 1]; what torchvision's
# pretrained networks expect, and what the tutorial normalizes every data set with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


def to_tensor_and_normalize(
    pil_image: Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size_hw: Sequence[int] | None = None,
) -> torch.Tensor:
    """A PIL image as a normalized tensor: [3, H, W] float32, `(pixel / 255 - mean) / std`.

    The tutorial's ToTensor + Normalize with ImageNet statistics by default. Images that
    are not RGB (grey, palette, RGBA, 16-bit) are converted to 8-bit RGB first (`to_rgb`).
    With `size_hw` (height, width) the 8-bit image is resized first (`resize_pixels`).
    """
    pixels = F.pil_to_tensor(to_rgb(pil_image, source=getattr(pil_image, "filename", None)))
    if size_hw is not None:
        pixels = resize_pixels(pixels, size_hw)
    return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(mean), list(std))


def resize_pixels(pixels: torch.Tensor, size_hw: Sequence[int]) -> torch.Tensor:
    """uint8 [C, H, W] resized to `size_hw` (height, width), antialiased, still uint8; the same
    resize as PASCAL's (`load_dataset.pascal.augment`). Unchanged (torchvision returns it) when
    it has that size."""
    return F.resize(pixels, list(size_hw), antialias=True)


@dataclass(frozen=True)
class NormalizedInput:
    """A decoded RGB image as a dataset that normalizes on the CPU gives it: float32
    [3, H, W], `(pixel / 255 - mean) / std` (`to_tensor_and_normalize`), at `size_wh`
    (width, height). The dataset refuses an image of another size; this resizes it
    (`resize_pixels`), so a model that is logged with it takes images of any size."""

    size_wh: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return to_tensor_and_normalize(image, self.mean, self.std, self.size_wh[::-1])


def file_list_key(image_paths: Sequence[Path]) -> str:
    """A hash of the files' names, sizes and modification times, in the given order.

    Cheap (one `stat` per file) and changes when a file is added, removed, renamed or
    rewritten; a copied folder may hash differently, which only costs a recomputation.
    """
    h = hashlib.sha256()
    for path in map(Path, image_paths):
        st = path.stat()
        h.update(f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def compute_mean_std(image_paths: Sequence[Path], cache_path: Path | None = None) -> MeanStd:
    """Per-channel mean and standard deviation of the pixels of `image_paths`, in [0, 1] units.

    Pass the training split's images only: statistics taken from validation or test
    images would leak information about them into the model's input.

    Every pixel of every image counts once (images are read as 8-bit RGB by `open_rgb`;
    sizes may differ). The std is the population std over all those pixels. Returns
    `((mean_r, mean_g, mean_b), (std_r, std_g, std_b))`.

    With `cache_path` the result is stored there as JSON, keyed by `file_list_key`,
    and read back on the next call with the same files; a folder that cannot be
    written to is not an error (the statistics are then computed each time).
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("compute_mean_std got no image files; pass the training split's images.")
    key = file_list_key(paths)
    if cache_path is not None and (cached := _read_cache(cache_path, key)) is not None:
        return cached

    total, total_sq, count = np.zeros(3), np.zeros(3), 0  # float64
    for path in paths:
        pixels = np.asarray(open_rgb(path), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        count += pixels.shape[0]
    mean = total / count
    # E[x^2] - E[x]^2 in float64 is exact enough for [0, 1] pixels; clip rounding below 0.
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    result = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if cache_path is not None:
        _write_cache(cache_path, key, result, len(paths))
    return result


def _read_cache(cache_path: Path, key: str) -> MeanStd | None:
    try:
        entry = json.loads(Path(cache_path).read_text())
        if entry.get("key") != key:
            return None
        return tuple(map(float, entry["mean"])), tuple(map(float, entry["std"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, unreadable or stale: recompute


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """A file object whose contents appear at `path` only when the block completes.

    Written as `.<name>.<random>.tmp` in the same folder, fsynced (a crash cannot leave a
    renamed file whose blocks never reached the disk), then renamed over `path`: a reader,
    or a crash at any moment, sees the old file or the new one, never half of one. Created
    with mode 0666 less the process's umask like any other output (not `tempfile.mkstemp`'s
    0600), so a team sharing a folder reads it too.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # O_EXCL: never another's file
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_cache(cache_path: Path, key: str, result: MeanStd, n_images: int) -> None:
    entry = {"key": key, "n_images": n_images, "mean": result[0], "std": result[1]}
    try:
        with atomic_file(cache_path, "w") as f:
            json.dump(entry, f, indent=1)
    except OSError:
        return  # a read-only data folder: the caller still gets the statistics
