"""PASCAL VOC class names, the VOC colour map, and segmentation mask -> multi-hot labels.

A VOC mask holds one class index per pixel: 0 is background, 1..20 the object classes in
the order of `VOC_CLASSES`, 255 the void border drawn around objects (VOC only; SBD masks
have no 255). A multi-hot label says which of the 20 object classes appear anywhere in
the mask; background and void are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from load_dataset.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "airplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining_table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted_plant",
    "sheep",
    "sofa",
    "train",
    "tv_monitor",
)
N_CLASSES = len(VOC_CLASSES)
VOID = 255


def return_label_names() -> list[str]:
    """The 20 class names; name k belongs to mask value k + 1."""
    return list(VOC_CLASSES)


def label_vector_from_mask(mask: np.ndarray, source: str | None = None) -> np.ndarray:
    """Multi-hot labels of one mask, as float32 [20] of 0/1.

    `mask` is [H, W] of integer class indices. `source` (a file name) only serves the error
    message. Raises DataError when a value is neither 0, 1..20 nor 255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        where = f" in {source}" if source else ""
        raise DataError(
            f"A segmentation mask{where} has shape {mask.shape}; expected [H, W] class "
            "indices (a palette 'P' or grey 'L' image, not a colour image)."
        )
    if mask.dtype == np.bool_:
        mask = mask.astype(np.uint8)
    if mask.dtype != np.uint8:
        if not np.issubdtype(mask.dtype, np.integer):
            if not np.all(np.mod(mask, 1) == 0):
                raise DataError(_bad_value_message(mask[np.mod(mask, 1) != 0].flat[0], source))
        if mask.size and (mask.min() < 0 or mask.max() > VOID):
            bad = mask.min() if mask.min() < 0 else mask.max()
            raise DataError(_bad_value_message(bad, source))
        mask = mask.astype(np.uint8)
    # Every value of the mask starts a run of equal pixels (row-major order), so a bincount
    # of the run starts finds the same values as one of all pixels: a 500 x 375 mask has a
    # few thousand runs, not 187,500 pixels (0.06 ms instead of 0.4 ms; a Python set: 2 ms).
    flat = mask.ravel()
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    present = np.bincount(flat[starts], minlength=256) > 0
    if flat.size:
        present[flat[0]] = True
    unexpected = np.flatnonzero(present[N_CLASSES + 1 : VOID])
    if unexpected.size:
        raise DataError(_bad_value_message(int(unexpected[0]) + N_CLASSES + 1, source))
    return present[1 : N_CLASSES + 1].astype(np.float32)


def _bad_value_message(value: object, source: str | None) -> str:
    where = f" in {source}" if source else ""
    return (
        f"Segmentation mask value {value}{where} is not a PASCAL VOC class index "
        "(allowed: 0 background, 1..20 classes, 255 void); check that the file is an "
        "unmodified VOC/SBD annotation."
    )


def get_label_vector(mask: Image.Image | np.ndarray) -> list[int]:
    """The tutorial's conversion: mask (PIL image or [H, W] array of class indices) -> 20 x 0/1.

    Entry k is 1 when class k + 1 (`return_label_names()[k]`) covers at least one pixel.
    0 (background) and 255 (void) are ignored; any other value outside 1..20 is a DataError.
    """
    source = getattr(mask, "filename", None) or None
    if isinstance(mask, Image.Image):
        if mask.mode not in ("P", "L", "I", "I;16"):
            raise DataError(
                f"Segmentation mask {source or ''} has mode {mask.mode!r}; expected class "
                "indices in a palette 'P' or grey 'L' image, not colours."
            )
        mask = np.asarray(mask)
    return [int(v) for v in label_vector_from_mask(mask, source)]


def label_names(label_vector: Sequence[float] | np.ndarray) -> list[str]:
    """The names of the classes set (> 0.5) in a 20-entry label vector, in class order."""
    values = np.asarray(label_vector).ravel()
    if values.size != N_CLASSES:
        raise ValueError(f"A PASCAL label vector has {N_CLASSES} entries, not {values.size}.")
    return [VOC_CLASSES[k] for k in np.flatnonzero(values > 0.5)]


def get_all_labels_string(label_vector: Sequence[float] | np.ndarray) -> str:
    """The tutorial's label string: the names of the classes present joined by one space,
    e.g. 'bird boat sofa'; '' when the vector is all zeros."""
    return " ".join(label_names(label_vector))


def voc_colormap() -> np.ndarray:
    """The VOC palette as uint8 [256, 3] RGB: row v is the colour of mask value v.

    Bits 0, 1, 2 of v set the highest remaining bit of red, green, blue; the next three bits
    of v the next lower bit, and so on (e.g. 1 -> (128, 0, 0), 255 -> (224, 224, 192)).
    """
    values = np.arange(256)
    cmap = np.zeros((256, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            bit = (values >> (3 * shift + channel)) & 1
            cmap[:, channel] |= bit << (7 - shift)
    return cmap.astype(np.uint8)


def colorize_mask(mask: np.ndarray) -> np.ndarray:
    """Class indices [H, W] -> RGB uint8 [H, W, 3] in the VOC colours."""
    return voc_colormap()[np.asarray(mask).astype(np.uint8)]
