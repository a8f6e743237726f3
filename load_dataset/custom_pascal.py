"""PascalVOC2012: PASCAL VOC 2012 (+ SBD) images with multi-hot class labels from their masks.

The segmentation masks say which of the 20 classes appear in an image, which turns the
segmentation data into a 20-label multi-label classification data set (the tutorial's idea).
Labels are computed once per image from the full-resolution mask (resizing first can erase
small objects) and kept in memory, optionally also in a small .npz file in `cache_dir`.

Every mask must have its image's size; this is checked when the labels are computed (the
image's size comes from its file header, nothing more is decoded), so the data set refuses a
mismatch when it is built, with or without augmentation or a cache.

Per sample the work is: decode the JPEG with Pillow, resize it while still uint8
(antialiased), and, only when a mask is needed (seglabel or cropping), decode and resize
the mask. `data` is uint8; the training loop scales and normalizes whole batches on the
device with `mean_std`. With `cache_dir`, the resized images and masks are decoded once into
memory-mapped arrays (pascal/cache.py) and every epoch reads them from there instead.

Data layout and downloads: data_README.md.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from load_dataset.errors import DataError
from load_dataset.images import image_size, open_image, open_rgb, to_rgb
from load_dataset.pascal import cache as pascal_cache
from load_dataset.pascal.augment import AUGMENTATIONS, PascalAugment, check_augment
from load_dataset.pascal.labels import (
    VOC_CLASSES,
    get_all_labels_string,
    get_label_vector,
    label_vector_from_mask,
    return_label_names,
    voc_colormap,
)
from load_dataset.pascal.layout import (
    README,
    Entry,
    find_sbd_root,
    find_voc_root,
    sbd_entries,
    voc_entries,
)
from load_dataset.pascal.visualize import build_augmentation_gallery, save_visualization
from load_dataset.utils import (
    IMAGENET_MEAN,  # ImageNet's statistics: what the pretrained VGG-16 expects
    IMAGENET_STD,
)

__all__ = [
    "AUGMENTATIONS",
    "VOC_CLASSES",
    "PascalInput",
    "PascalVOC2012",
    "build_augmentation_gallery",
    "get_all_labels_string",
    "get_label_vector",
    "read_image",
    "read_mask",
    "return_label_names",
    "save_visualization",
    "voc_colormap",
]

SETNAMES = ("train", "val")
RESTORE_IMAGE = f"the file is corrupt or truncated: restore it from the original archive ({README})"
RESTORE_MASK = (
    "the file is corrupt or not a VOC/SBD annotation: restore it from the original archive "
    f"({README})"
)


class PascalVOC2012(Dataset):
    """PASCAL VOC 2012 segmentation images as a 20-class multi-label data set.

    setname 'train': VOC 2012 segmentation train plus, when `sbd_dataset_dir` is given, SBD
    `train_noval`, de-duplicated by image id (an id in both keeps VOC's annotation).
    setname 'val': VOC 2012 segmentation val. Validation samples are never augmented:
    `augment` is ignored for 'val', so train and val can share one set of arguments.

    Sample i: {'data': uint8 [3, S, S] (RGB, not normalized: see `mean_std`),
    'label': float32 [20] multi-hot, 'seglabel': int64 [S, S] class indices 0..20 and 255
    (only when `return_seglabel`), 'img_idx': i}, with S = `image_size`.

    Args:
        setname: 'train' or 'val'.
        voc_dataset_dir: the folder holding VOCdevkit/VOC2012 (also accepted: the VOCdevkit
            folder, or the VOC2012 folder inside VOCdevkit).
        sbd_dataset_dir: the SBD folder holding img/, cls/ and train_noval.txt, or None.
        image_size: side S of the square images, in pixels.
        augment: one of AUGMENTATIONS ('none', 'flip', 'flip_scale_crop', 'full').
        download: fetch VOC 2012 / SBD with torchvision when they are not on disk yet.
        return_seglabel: add the resized mask to each sample. Without it (and without
            cropping) no mask is decoded per sample.
        cache_dir: folder for the split's cache, or None to read the files every epoch.
            The first construction decodes every image and mask once and writes them,
            resized, into memory-mapped .npy files (S = 320: 409,600 bytes per image),
            plus the label table as a small .npz; later constructions reuse them while
            the files' names, sizes and modification times are unchanged
            (pascal/cache.py). For augment 'none' and 'flip' a cached sample is exactly the
            uncached one. With crops ('flip_scale_crop', 'full') the crop is taken from the
            cached S x S image and mask, and the label from the cropped resized mask.

    `path_flags` are the command-line flags of its folder arguments, flag -> (argument, help);
    src.cli gives them to the Demos and `python -m src.run_experiment`.
    """

    path_flags: dict[str, tuple[str, str]] = {
        "--voc-dir": ("voc_dataset_dir", "the folder holding VOCdevkit/VOC2012"),
        "--sbd-dir": (
            "sbd_dataset_dir",
            "the SBD folder holding img/, cls/, train_noval.txt; '' trains on VOC 2012 alone",
        ),
        "--cache-dir": ("cache_dir", "folder for the resized images and masks, decoded once"),
    }

    def __init__(
        self,
        setname: str,
        voc_dataset_dir: str | os.PathLike,
        sbd_dataset_dir: str | os.PathLike | None = None,
        image_size: int = 320,
        augment: str = "none",
        download: bool = False,
        return_seglabel: bool = True,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if setname not in SETNAMES:
            raise ValueError(
                f"setname={setname!r} is not a PASCAL VOC 2012 split; use 'train' or 'val' "
                "(the test annotations are not public)."
            )
        check_augment(augment)
        self.setname = setname
        self.image_size = int(image_size)
        self.augment = augment if setname == "train" else "none"
        self.return_seglabel = bool(return_seglabel)
        self.transform = PascalAugment(self.augment, self.image_size)
        self._resize = PascalAugment("none", self.image_size)
        self.label_meanings: list[str] = return_label_names()
        self.mean_std = (IMAGENET_MEAN, IMAGENET_STD)
        # What an unaugmented sample's `data` is made of; the run's MLflow model applies it.
        self.input_transform = PascalInput(self.image_size)

        voc_root = find_voc_root(voc_dataset_dir, download=download)
        voc_train = voc_entries(voc_root, "train")
        voc_val = voc_entries(voc_root, "val")
        sbd = []
        if sbd_dataset_dir:  # None or "": VOC 2012 alone
            sbd = sbd_entries(find_sbd_root(sbd_dataset_dir, download=download))
        train, dropped = merge_by_id(voc_train, sbd)
        check_disjoint(train, voc_val)

        chosen = train if setname == "train" else {e.image_id: e for e in voc_val}
        self.entries: list[Entry] = [chosen[k] for k in sorted(chosen)]
        self.image_ids: list[str] = [e.image_id for e in self.entries]
        n_voc = sum(e.source == "voc" for e in self.entries)
        self.source_counts = {
            "voc": n_voc,
            "sbd": len(self.entries) - n_voc,
            "duplicates_dropped": dropped if setname == "train" else 0,
        }
        self.cache: pascal_cache.ImageCache | None = None
        labels = None
        if cache_dir is not None:
            self.cache, labels = pascal_cache.open_or_build(
                cache_dir, setname, self.entries, self.image_size, self._decode_resized
            )
            if labels is not None:  # just built: the masks were read anyway, store the table
                path = pascal_cache.label_table_path(cache_dir, setname, self.entries)
                pascal_cache.write_label_table(path, self.image_ids, labels)
        if labels is None:
            labels = label_table(self.entries, setname, cache_dir)
        self.labels: np.ndarray = labels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        needs_mask = self.return_seglabel or self.transform.crops
        if self.cache is not None:
            image, mask = self.cache.sample(i, with_mask=needs_mask)
            image, mask, label = self.transform(image, mask, presized=True)
        else:
            entry = self.entries[i]
            image = read_image(entry.image_path, padded=True)
            mask = None
            if needs_mask:
                mask = torch.from_numpy(read_mask(entry.mask_path))
                _check_same_size(_wh(image), _wh(mask), entry)
            image, mask, label = self.transform(image, mask)
        if label is None:  # no crop: the stored full-resolution label holds
            label = self.labels[i]
        sample: dict[str, torch.Tensor | int] = {
            "data": image,
            "label": torch.tensor(label, dtype=torch.float32),
            "img_idx": i,
        }
        if self.return_seglabel:
            sample["seglabel"] = mask.long()
        return sample

    def _decode_resized(self, i: int) -> pascal_cache.Decoded:
        """What the cache stores for image i: image uint8 [3, S, S], mask uint8 [S, S]
        (resized exactly as an unaugmented sample) and the full-resolution label [20]."""
        entry = self.entries[i]
        image = read_image(entry.image_path, padded=True)
        mask = torch.from_numpy(read_mask(entry.mask_path))
        _check_same_size(_wh(image), _wh(mask), entry)
        label = label_vector_from_mask(mask.numpy(), source=entry.mask_path)
        image, mask, _ = self._resize(image, mask)
        return image, mask, label

    def full_resolution(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """Image i as a PIL RGB image and its mask as uint8 [H, W], both unresized."""
        entry = self.entries[i]
        image, mask = read_image(entry.image_path), read_mask(entry.mask_path)
        _check_same_size(_wh(image), _wh(mask), entry)
        return Image.fromarray(image.permute(1, 2, 0).numpy()), mask


def merge_by_id(voc: list[Entry], sbd: list[Entry]) -> tuple[dict[str, Entry], int]:
    """VOC entries plus the SBD entries of other ids; and how many SBD entries were dropped."""
    merged = {e.image_id: e for e in voc}
    dropped = 0
    for e in sbd:
        if e.image_id in merged:
            dropped += 1  # same photo, VOC's finer annotation (with void borders) wins
        else:
            merged[e.image_id] = e
    return merged, dropped


def check_disjoint(train: dict[str, Entry], val: list[Entry]) -> None:
    """DataError when a validation image id is also a training image id."""
    shared = sorted(set(train) & {e.image_id for e in val})
    if shared:
        sources = sorted({train[k].source for k in shared})
        raise DataError(
            f"{len(shared)} image ids (e.g. {shared[0]}) are in both the training set "
            f"(from {'+'.join(sources)}) and VOC 2012 val; use SBD's train_noval.txt, not its "
            f"train.txt, see {README}."
        )


def read_image(path: str, padded: bool = False) -> torch.Tensor:
    """An image file as RGB uint8 [3, H, W], with channels-last strides.

    `padded=True` gives uint8 [4, H, W]: R, G, B and a padding channel (Pillow's own RGBX
    pixel layout), for `PascalAugment`, which resizes all four and keeps the first three.
    Skipping the RGB packing (Pillow) and unpacking (torch's uint8 resize works on 4-byte
    pixels) saves ~0.07 ms of the ~1.8 ms an image costs; the RGB values are the same.
    Read by `load_dataset.images.open_rgb`, as every image of the repository.
    """
    rgb = open_rgb(path, fix=RESTORE_IMAGE)
    if padded:
        return padded_pixels(rgb)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def padded_pixels(rgb: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 [4, H, W] (R, G, B, padding), channels-last: see `read_image`."""
    # bytearray: torch wants writable memory (the resize only reads it).
    pixels = torch.frombuffer(bytearray(rgb.tobytes("raw", "RGBX")), dtype=torch.uint8)
    return pixels.view(rgb.height, rgb.width, 4).permute(2, 0, 1)


@dataclass
class PascalInput:
    """A decoded RGB image (PIL) -> uint8 [3, S, S], as an unaugmented sample's `data`: the
    same pixels (`padded_pixels`) through the same resize (`PascalAugment('none', S)`) as
    `PascalVOC2012.__getitem__` and its cache. The loop, and the MLflow model, then normalize
    it with `mean_std`."""

    image_size: int
    _resize: PascalAugment | None = field(default=None, repr=False, compare=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self._resize is None:
            self._resize = PascalAugment("none", self.image_size)
        resized, _, _ = self._resize(padded_pixels(to_rgb(image)))
        return resized


def read_mask(path: str) -> np.ndarray:
    """A VOC palette PNG or an SBD cls/*.mat as uint8 [H, W] class indices (a PNG turned by
    its EXIF orientation, as images are)."""
    try:
        if path.endswith(".mat"):
            from scipy.io import loadmat

            mat = loadmat(path, variable_names=["GTcls"])
            # torchvision's SBDataset reads the same field the same way.
            mask = np.asarray(mat["GTcls"][0]["Segmentation"][0])
        else:
            with open_image(path, fix=RESTORE_MASK) as im:
                if im.mode not in ("P", "L"):
                    raise DataError(
                        f"Mask {path} is a {im.mode!r} image; VOC masks are palette ('P') "
                        f"PNGs of class indices: restore it from the original archive ({README})."
                    )
                ImageOps.exif_transpose(im, in_place=True)  # as its image is read (open_rgb)
                mask = np.array(im)
    except DataError:
        raise
    except Exception as e:  # a corrupt file can fail in many ways inside a decoder
        raise DataError(
            f"Mask {path} cannot be read ({type(e).__name__}: {e}); {RESTORE_MASK}."
        ) from None
    if mask.ndim != 2:
        raise DataError(f"Mask {path} has shape {mask.shape}; expected [H, W] class indices.")
    return mask.astype(np.uint8, copy=False)


def _wh(pixels: torch.Tensor | np.ndarray) -> tuple[int, int]:
    """(width, height) of an image [C, H, W] or a mask [H, W]."""
    return int(pixels.shape[-1]), int(pixels.shape[-2])


def _check_same_size(image_wh: tuple[int, int], mask_wh: tuple[int, int], entry: Entry) -> None:
    """DataError naming both files and both sizes when a mask does not fit its image."""
    if tuple(image_wh) != tuple(mask_wh):
        raise DataError(
            f"Mask {entry.mask_path} is {mask_wh[0]} x {mask_wh[1]} pixels but its image "
            f"{entry.image_path} is {image_wh[0]} x {image_wh[1]} (width x height); a mask "
            f"must have its image's size: restore both from the original archive ({README})."
        )


def _checked_label(entry: Entry) -> np.ndarray:
    """The label of the entry's full-resolution mask, once the mask is checked to have the size
    of its image (read from the image file's header: nothing more is decoded)."""
    mask = read_mask(entry.mask_path)
    try:
        image_wh = image_size(entry.image_path, fix=RESTORE_IMAGE)
    except DataError:
        image_wh = None  # a header that cannot be read: reading the sample names the file
    if image_wh is not None:
        _check_same_size(image_wh, _wh(mask), entry)
    return label_vector_from_mask(mask, source=entry.mask_path)


def label_table(
    entries: list[Entry], setname: str, cache_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """float32 [N, 20]: row n is the multi-hot label of entries[n], from its full-res mask.

    Computing it checks that every mask has its image's size (DataError otherwise). With
    `cache_dir`, the table is read from / written to an .npz whose name holds a hash of every
    image and mask file's name, size and modification time, so a changed file is noticed and
    a table read back stands for masks checked against these very images.
    """
    path = None
    if cache_dir is not None:
        path = pascal_cache.label_table_path(cache_dir, setname, entries)
        cached = pascal_cache.read_label_table(path, [e.image_id for e in entries])
        if cached is not None:
            return cached
    cores = pascal_cache.usable_cores()
    if cores > 1:
        # Decoders release the GIL for most of their work, so threads overlap well here.
        with ThreadPoolExecutor(max_workers=min(8, cores)) as pool:
            rows = list(pool.map(_checked_label, entries, chunksize=64))
    else:  # on one core, threads would only add switching
        rows = [_checked_label(e) for e in entries]
    labels = np.stack(rows) if rows else np.zeros((0, len(VOC_CLASSES)), np.float32)
    if path is not None:
        pascal_cache.write_label_table(path, [e.image_id for e in entries], labels)
    return labels
