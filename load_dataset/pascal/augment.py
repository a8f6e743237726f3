"""Joint image + mask augmentation on uint8 tensors, chosen by name in the config.

| `augment`         | what happens to one training sample                                   |
| ----------------- | --------------------------------------------------------------------- |
| "none"            | resize to image_size x image_size                                     |
| "flip"            | resize, then a horizontal flip with probability 0.5                   |
| "flip_scale_crop" | random crop (30-100% of the area, aspect 3:4..4:3), resize, flip      |
| "full"            | as "flip_scale_crop", then brightness/contrast/saturation jitter      |

The crop is taken from the full-resolution image and mask, and the label is recomputed
from the cropped full-resolution mask (a crop can remove an object; resizing first could
erase small ones). Flips keep the classes present, so the stored label still holds.

From a cache of already resized images (`presized=True`, see pascal/cache.py) "none" and
"flip" give exactly what they give from the files. A crop is then taken from the resized
S x S image and mask and resized back to S x S, and its label comes from the cropped
resized mask, so an object that the first resize erased cannot count (the crop box is
drawn for an S x S image, so the same seed crops differently than from the files).

All randomness comes from torch's global RNG, which the DataLoader seeds per worker,
so a seeded run draws the same augmentations.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from load_dataset.pascal.labels import label_vector_from_mask

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "flip_scale_crop", "full")
CROP_SCALE = (0.3, 1.0)  # milder than ImageNet's 0.08: a multi-label image should keep objects
# No hue jitter: on a 320x320 uint8 image it costs ~4 ms (an RGB->HSV round trip in float),
# five times the rest of the sample's work; brightness, contrast and saturation cost ~0.6 ms.
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4}


def check_augment(augment: str) -> str:
    """`augment` itself, or a ValueError naming the allowed values."""
    if augment not in AUGMENTATIONS:
        allowed = ", ".join(repr(a) for a in AUGMENTATIONS)
        raise ValueError(f"augment={augment!r} is not known; use one of {allowed}.")
    return augment


class PascalAugment:
    """Resize (+ augment) one image and, optionally, its mask to `image_size` x `image_size`.

    Call with image uint8 [3, H, W] (or [4, H, W], RGB + padding: see
    custom_pascal.read_image) and mask uint8 [H, W] (or None); returns
    (image uint8 [3, S, S], mask uint8 [S, S] or None, label float32 [20] or None).
    The label is not None only when a crop was taken and a mask was given: it then
    replaces the image's stored label. `presized=True` says the inputs are already
    S x S (from the cache): they are then only resized again after a crop.
    """

    def __init__(self, augment: str = "none", image_size: int = 320) -> None:
        self.augment = check_augment(augment)
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, not {image_size}.")
        size = [self.image_size, self.image_size]
        self._size = size
        self._crop = (
            v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True)
            if augment in ("flip_scale_crop", "full")
            else None
        )
        self._flip = v2.RandomHorizontalFlip(p=0.5) if augment != "none" else None
        self._jitter = v2.ColorJitter(**JITTER) if augment == "full" else None

    @property
    def crops(self) -> bool:
        """True when the pipeline crops, i.e. labels must come from each sample's mask."""
        return self._crop is not None

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor | None = None, presized: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray | None]:
        label = None
        if presized and tuple(image.shape[1:]) != tuple(self._size):
            raise ValueError(f"presized image is {tuple(image.shape[1:])}, not {self._size}")
        if self._crop is not None:
            box = self._crop.make_params([image])  # draws from torch's RNG
            rows = slice(box["top"], box["top"] + box["height"])
            cols = slice(box["left"], box["left"] + box["width"])
            image = image[:, rows, cols]
            if mask is not None:
                mask = mask[rows, cols]
                label = label_vector_from_mask(mask.numpy())
        if not presized or self._crop is not None:
            # uint8 resize: ~4x cheaper than resizing float, and antialiased.
            image = F.resize(image, self._size, antialias=True)
            if mask is not None:
                nearest = v2.InterpolationMode.NEAREST
                mask = F.resize(mask[None], self._size, interpolation=nearest)[0]
        image = image[:3]  # drops a padding channel, if any
        if self._flip is not None:
            if mask is None:
                image = self._flip(image)
            else:
                image, mask = self._flip(tv_tensors.Image(image), tv_tensors.Mask(mask))
                mask = mask.as_subclass(torch.Tensor)
        if self._jitter is not None:
            image = self._jitter(image)
        return image.as_subclass(torch.Tensor), mask, label
