"""torchvision's built-in classification datasets (MNIST, CIFAR-10, SVHN, ...) as experiments.

`TorchvisionClassification(setname, name=...)` wraps a torchvision dataset into this
repository's dataset contract, so an experiment only names it in its TOML:

    [data]
    dataset = "load_dataset.builtin:TorchvisionClassification"
    problem = "multiclass"
    [data.args]
    name = "CIFAR10"
    root = "data"          # resolved against the repository root by src.config
    download = true        # once; afterwards false (or leave it out)

Splits: 'test' is the dataset's own test split; 'train' and 'val' are both carved from its
training split: a seeded permutation (`split_seed`) puts round(val_fraction * N) images in
'val' and the rest in 'train' (disjoint, together all of the training split, each in index
order). `split_info` records all of it, and the run records `split_info` as tags.

Samples follow the fast path of the contract: `data` is uint8 [C, H, W] and `mean_std` says
how the training loop normalizes it on the device. Defaults (`normalization="auto"`): 3
channels get the ImageNet mean/std (what the repository's models and any pretrained weights
expect); 1 channel gets mean 0.5, std 0.5, i.e. [-1, 1]. Grayscale datasets (MNIST, ...)
are repeated to 3 channels by default so that 3-channel models take them unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import tarfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from load_dataset.errors import DataError
from load_dataset.images import reader_args
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD, resize_pixels

SETNAMES = ("train", "val", "test")
NORMALIZATIONS = ("auto", "imagenet", "half", "none")

# torchvision downloads with urllib and no timeout: a firewall that drops packets would
# hang the run forever. Each connect/read waits at most this long (a live server answers
# well within it, so slow but working downloads still finish).
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class BuiltinLayout:
    """What this module knows about one torchvision dataset class.

    split_arg: "train" (the class takes train: bool) or "split" (split: str).
    array_layout: axes of the class's in-memory `data` array ("NHW", "NHWC" or "NCHW"),
        read directly instead of through PIL.
    targets_attr: the attribute with the integer class of every image.
    files: where the files lie under `root` (a sub-folder, or file names), for error messages.
    """

    split_arg: str
    array_layout: str
    targets_attr: str
    files: str

    def where(self, root: str) -> str:
        return f"{root}/{self.files}" if self.files.endswith("/") else f"{root} ({self.files})"


BUILTINS: dict[str, BuiltinLayout] = {
    "MNIST": BuiltinLayout("train", "NHW", "targets", "MNIST/raw/"),
    "FashionMNIST": BuiltinLayout("train", "NHW", "targets", "FashionMNIST/raw/"),
    "KMNIST": BuiltinLayout("train", "NHW", "targets", "KMNIST/raw/"),
    "CIFAR10": BuiltinLayout("train", "NHWC", "targets", "cifar-10-batches-py/"),
    "CIFAR100": BuiltinLayout("train", "NHWC", "targets", "cifar-100-python/"),
    "SVHN": BuiltinLayout("split", "NCHW", "labels", "train_32x32.mat, test_32x32.mat"),
    "STL10": BuiltinLayout("split", "NCHW", "labels", "stl10_binary/"),
}

# Datasets whose torchvision class has no `classes` attribute.
_CLASS_NAMES = {"SVHN": [str(d) for d in range(10)]}

_SUPPORTED_TEXT = (
    f"{', '.join(BUILTINS)}, or another classification dataset of torchvision.datasets "
    "whose class takes train= or split="
)


def dataset_class(name: str) -> tuple[type, str]:
    """The torchvision class called `name` and how it picks a split ("train" or "split").

    Raises DataError for a name that is not a torchvision dataset taking train= or split=.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        close = [k for k in BUILTINS if k.lower() == str(name).lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"Unknown torchvision dataset name {name!r}{hint}; supported are {_SUPPORTED_TEXT}."
        )
    if name in BUILTINS:
        return cls, BUILTINS[name].split_arg
    params = inspect.signature(cls).parameters
    for arg in ("train", "split"):
        if arg in params:
            return cls, arg
    raise DataError(
        f"torchvision.datasets.{name} takes neither train= nor split=, so this class cannot "
        f"pick its splits; supported are {_SUPPORTED_TEXT}."
    )


def train_val_indices(
    n_source: int, val_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Carve a validation split from a training split of `n_source` images.

    Returns (train, val): int64 index arrays into the training split, each sorted, disjoint,
    together covering range(n_source). len(val) = round(val_fraction * n_source); which
    indices go to val depends only on `split_seed`.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise DataError(f"val_fraction must be a number between 0 and 1, got {val_fraction!r}.")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}.")
    n_val = round(val_fraction * n_source)
    if not 1 <= n_val <= n_source - 1:
        raise DataError(
            f"val_fraction = {val_fraction} of a training split of {n_source} images leaves "
            f"{n_val} for validation and {n_source - n_val} for training; choose a fraction "
            "that leaves at least one image in each."
        )
    order = np.random.default_rng(split_seed).permutation(n_source)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def normalization_stats(
    normalization: str, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for images scaled to [0, 1].

    "auto": ImageNet stats for 3 channels, 0.5/0.5 for 1 channel; "imagenet": ImageNet stats
    (3 channels only); "half": 0.5/0.5 per channel ([-1, 1]); "none": 0/1 (stays [0, 1]).
    """
    if normalization not in NORMALIZATIONS:
        raise DataError(
            f"normalization = {normalization!r} is not one of {', '.join(NORMALIZATIONS)}."
        )
    if normalization == "imagenet" or (normalization == "auto" and channels == 3):
        if channels != 3:
            raise DataError(
                "normalization = 'imagenet' needs channels = 3; use 'half' or 'none' for 1."
            )
        return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
    if normalization == "none":
        return (0.0,) * channels, (1.0,) * channels
    return (0.5,) * channels, (0.5,) * channels


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _is_missing(e: BaseException) -> bool:
    """True for torchvision's 'files are not there' errors (its wording: 'Dataset not found
    [or corrupted]. You can use download=True to download it')."""
    if isinstance(e, FileNotFoundError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("not found" in text or "download=true" in text)


def _reason(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_source(name: str, root: str, source_split: str, download: bool) -> Any:
    """The torchvision dataset `name`, split 'train' or 'test', from `root`.

    Missing files -> DataError saying to pass download = true; a failed download (offline,
    server down, timeout after DOWNLOAD_TIMEOUT_S per connect/read) -> DataError pointing to
    the manual route in data_README.md. Downloads only when the files are missing.
    """
    cls, split_arg = dataset_class(name)
    kwargs = {"train": source_split == "train"} if split_arg == "train" else {"split": source_split}
    kwargs |= reader_args(cls, kwargs)  # image files (Flowers102, ...) read as the datasets read
    files = BUILTINS[name].where(root) if name in BUILTINS else str(root)
    try:
        return cls(root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError) as e:
        if not _is_missing(e):
            raise
        missing = e
    except ValueError as e:  # verify_str_arg: this class has no split of that name
        raise DataError(
            f"torchvision.datasets.{name} rejects {kwargs} ({_reason(e)}); this class maps "
            "'train'/'val' to its training split and 'test' to its test split."
        ) from None
    except TypeError as e:  # a class that needs arguments of its own (EMNIST's split=)
        raise DataError(
            f"torchvision.datasets.{name} needs arguments this class does not pass "
            f"({_reason(e)}); supported are {_SUPPORTED_TEXT}."
        ) from None
    if not download:
        raise DataError(
            f"{name} ({source_split} split) is not in the root folder {root} "
            f"(torchvision: {_reason(missing)}); pass download = true in [data.args] "
            f"(or --download) to fetch it once, or put the files under {files} "
            "as data_README.md describes."
        )
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            return cls(root, download=True, **kwargs)
    except (OSError, RuntimeError, EOFError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise DataError(
            f"Could not download {name} into the root folder {root} ({_reason(e)}); "
            "without network access fetch the files by hand as data_README.md describes "
            f"(torchvision built-in datasets), put them under {files} and run with "
            "download = false."
        ) from None


def _targets_of(source: Any, name: str) -> np.ndarray:
    """int64 [N] class index of every image of a torchvision dataset."""
    attrs = [BUILTINS[name].targets_attr] if name in BUILTINS else ["targets", "labels", "_labels"]
    for attr in attrs:
        values = getattr(source, attr, None)
        if values is not None and len(values) == len(source):
            targets = np.asarray(values)
            break
    else:  # no label attribute: read every sample (slow, but works for any class)
        targets = np.asarray([source[i][1] for i in range(len(source))])
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise DataError(
            f"torchvision.datasets.{name} does not give one integer class per image "
            f"(got {targets.dtype} of shape {targets.shape}); it is not a classification dataset."
        )
    return targets.astype(np.int64)


def _images_as_tensor(source: Any, layout: str, indices: np.ndarray) -> torch.Tensor:
    """uint8 [n, C, H, W] of the selected images from the class's in-memory `data` array."""
    data = source.data
    data = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if layout == "NHW":
        data = data.unsqueeze(1)
    elif layout == "NHWC":
        data = data.permute(0, 3, 1, 2)
    return data[torch.from_numpy(indices)].contiguous()


class TorchvisionClassification(Dataset):
    """A torchvision classification dataset as a dataset of this repository.

    Args:
        setname: 'train' or 'val' (both carved from the training split) or 'test'.
        name: torchvision class name: MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100, SVHN,
            STL10, or another classification dataset taking train= or split=.
        root: folder torchvision reads (and downloads into), e.g. <root>/cifar-10-batches-py.
        val_fraction: share of the training split held out as 'val' (rounded to whole images).
        split_seed: seed of the permutation that picks the 'val' images.
        download: let torchvision download the files when they are missing.
        image_size: None keeps the native size; an int gives square [s, s]; [h, w] that size
            (antialiased bilinear resize of the uint8 image).
        channels: 3 (grayscale repeated) or 1 (color converted to luma).
        normalization: "auto", "imagenet", "half" or "none", see `normalization_stats`.

    Sample: {'data': uint8 [channels, H, W], 'label': float32 [K] one-hot, 'img_idx': int}.
    The loop normalizes `data` on the device with `mean_std` (per channel, for [0, 1] images).

    `path_flags` are the command-line flags of its folder arguments, flag -> (argument, help);
    src.cli gives them to `python -m src.run_experiment`.
    """

    path_flags: dict[str, tuple[str, str]] = {
        "--data-dir": ("root", "the folder torchvision reads and downloads into"),
    }

    def __init__(
        self,
        setname: str,
        name: str,
        root: str = "data",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
        image_size: int | Sequence[int] | None = None,
        channels: int = 3,
        normalization: str = "auto",
    ) -> None:
        if setname not in SETNAMES:
            raise ValueError(f"setname {setname!r} is not one of {', '.join(SETNAMES)}.")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels!r}.")
        self.setname = setname
        self.name = name
        self.root = str(root)
        self.channels = channels
        self.image_size = _check_image_size(image_size)
        self.mean_std = normalization_stats(normalization, channels)

        source_split = "test" if setname == "test" else "train"
        source = open_source(name, self.root, source_split, download)
        targets = _targets_of(source, name)
        n_source = len(targets)
        if setname == "test":
            indices = np.arange(n_source, dtype=np.int64)
        else:
            train, val = train_val_indices(n_source, val_fraction, split_seed)
            indices = train if setname == "train" else val

        self.label_meanings = _class_names(source, name, targets)
        n_classes = len(self.label_meanings)
        if targets.size and (targets.min() < 0 or targets.max() >= n_classes):
            raise DataError(
                f"{name} ({source_split} split) has class indices outside 0..{n_classes - 1}; "
                "only labelled splits can be used."
            )
        self.labels = np.eye(n_classes, dtype=np.float32)[targets[indices]]
        self.image_ids = [f"{source_split}/{i:06d}" for i in indices]
        self.split_info: dict[str, Any] = {
            "dataset": name,
            "source_split": source_split,
            "source_size": n_source,
            "size": len(indices),
        }
        if setname != "test":
            self.split_info.update(val_fraction=float(val_fraction), split_seed=int(split_seed))

        if name in BUILTINS:  # whole split in memory: take the array, drop the object
            self._images: torch.Tensor | None = _images_as_tensor(
                source, BUILTINS[name].array_layout, indices
            )
            self._source = None
        else:
            self._images = None
            source.transform = source.target_transform = None
            self._source = source
        self._source_indices = indices

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {
            "data": self.image(idx),
            "label": torch.tensor(self.labels[idx]),
            "img_idx": idx,
        }

    def image(self, idx: int) -> torch.Tensor:
        """uint8 [channels, H, W] of sample `idx`, resized if image_size is set."""
        from torchvision.transforms.v2 import functional as tvf

        if self._images is not None:
            x = self._images[idx]
        else:
            img = self._source[int(self._source_indices[idx])][0]
            x = tvf.pil_to_tensor(img.convert("L" if self.channels == 1 else "RGB"))
        return model_pixels(x, self.channels, self.image_size)

    @property
    def input_transform(self) -> BuiltinInput:
        """A decoded RGB image -> its sample's `data` (see `BuiltinInput`)."""
        size = self.image_size
        if size is None and self._images is not None:  # native size, one for the whole split
            size = (int(self._images.shape[-2]), int(self._images.shape[-1]))
        return BuiltinInput(self.channels, size)


def model_pixels(x: torch.Tensor, channels: int, size_hw: tuple[int, int] | None) -> torch.Tensor:
    """uint8 [1 or 3, H, W] -> uint8 [channels, H, W] (grey repeated, colour to luma), resized
    to `size_hw` (antialiased) unless None."""
    from torchvision.transforms.v2 import functional as tvf

    if x.shape[0] == 1 and channels == 3:
        x = x.repeat(3, 1, 1)
    elif x.shape[0] == 3 and channels == 1:
        x = tvf.rgb_to_grayscale(x)
    return x if size_hw is None else resize_pixels(x, size_hw)


@dataclass(frozen=True)
class BuiltinInput:
    """A decoded RGB image (PIL) -> uint8 [channels, H, W] as `TorchvisionClassification`
    gives its samples (`model_pixels`), at `size_hw` when set; the loop and the run's MLflow
    model normalize it with `mean_std`."""

    channels: int
    size_hw: tuple[int, int] | None

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvf

        return model_pixels(tvf.pil_to_tensor(image.convert("RGB")), self.channels, self.size_hw)


def _check_image_size(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        isinstance(image_size, (list, tuple))
        and len(image_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)
    ):
        return int(image_size[0]), int(image_size[1])
    raise DataError(f"image_size must be a positive int or [height, width], got {image_size!r}.")


def _class_names(source: Any, name: str, targets: np.ndarray) -> list[str]:
    if name in _CLASS_NAMES:
        return list(_CLASS_NAMES[name])
    classes = getattr(source, "classes", None)
    if classes:
        return [str(c) for c in classes]
    # No names anywhere: number the classes that occur.
    return [str(i) for i in range(int(targets.max()) + 1 if targets.size else 0)]
