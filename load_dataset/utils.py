"""Image processing shared by the datasets: tensor conversion, normalization, split statistics."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from load_dataset.errors import DataError

# Per-channel statistics of ImageNet for images scaled to [0, 1]; what torchvision's
# pretrained networks expect, and what the tutorial normalizes every data set with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


def to_tensor_and_normalize(
    pil_image: Image.Image,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """A PIL image as a normalized tensor: [3, H, W] float32, `(pixel / 255 - mean) / std`.

    The tutorial's ToTensor + Normalize with ImageNet statistics by default. Images that
    are not RGB (grey, palette, RGBA) are converted to RGB first.
    """
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    pixels = torch.from_numpy(np.array(pil_image, dtype=np.uint8))  # [H, W, 3]
    x = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def file_list_key(image_paths: Sequence[Path]) -> str:
    """A hash of the files' names, sizes and modification times, in the given order.

    Cheap (one `stat` per file) and changes when a file is added, removed, renamed or
    rewritten; a copied folder may hash differently, which only costs a recomputation.
    """
    h = hashlib.sha256()
    for path in image_paths:
        st = Path(path).stat()
        h.update(f"{Path(path).name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def compute_mean_std(image_paths: Sequence[Path], cache_path: Path | None = None) -> MeanStd:
    """Per-channel mean and standard deviation of the pixels of `image_paths`, in [0, 1] units.

    Pass the training split's images only: statistics taken from validation or test
    images would leak information about them into the model's input.

    Every pixel of every image counts once (images are converted to RGB; sizes may
    differ). The std is the population std over all those pixels. Returns
    `((mean_r, mean_g, mean_b), (std_r, std_g, std_b))`.

    With `cache_path` the result is stored there as JSON, keyed by `file_list_key`,
    and read back on the next call with the same files; a folder that cannot be
    written to is not an error (the statistics are then computed each time).
    """
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("compute_mean_std got no image files; pass the training split's images.")
    key = file_list_key(paths)
    cached = _read_cache(cache_path, key) if cache_path is not None else None
    if cached is not None:
        return cached

    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    count = 0
    for path in paths:
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"Cannot read image {path} ({err}); replace or remove it.") from err
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


def _write_cache(cache_path: Path, key: str, result: MeanStd, n_images: int) -> None:
    cache_path = Path(cache_path)
    entry = {"key": key, "n_images": n_images, "mean": result[0], "std": result[1]}
    try:
        # Temp file + rename: readers in other processes never see half a file.
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=cache_path.name, suffix=".tmp")
    except OSError:
        return  # a read-only data folder: the caller still gets the statistics
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
        os.replace(tmp, cache_path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
