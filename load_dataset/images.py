"""Reading image files: the one reader of every image the repository decodes.

TinyData, PascalVOC2012, torchvision's ImageFolder, DatasetFolder and its other datasets that
take a `loader` (given `open_rgb` by `reader_args` where the training set-up builds them),
`python -m src.serve.predict`, the Demos and the benchmarks all read an image file through
`open_rgb`, so a model predicts on exactly the pixels it was trained on. One decision for
every file:

- image files are those whose suffix is in IMAGE_SUFFIXES, hidden files left out
  (`is_image_file`); what they hold must be one of FORMATS, whatever the suffix says;
- the EXIF orientation is applied: a phone photo stands as every viewer shows it;
- grey, palette, 1-bit, CMYK and alpha images become 8-bit RGB; 16-bit images are scaled to
  8 bits (`to_rgb`);
- a file of several frames (an animated GIF, WebP or PNG, a multi-page TIFF) is refused:
  which frame is the sample is not known. A camera's MPO JPEG is read as its first frame,
  the photo (the others are previews or depth maps);
- an image with more pixels than `PIL.Image.MAX_IMAGE_PIXELS` is refused.

Every refusal is a DataError naming the file.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision.datasets.folder import default_loader

from load_dataset.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Pillow's names of the formats those files may hold (PPM covers .pgm; JPEG a camera's MPO).
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
# What a file that cannot be decoded asks of the user, unless the caller knows better.
REPLACE_OR_REMOVE = "replace or remove it"
_REFUSE_BOMB_WARNINGS = ("error", None, Image.DecompressionBombWarning, None, 0)
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@contextmanager
def open_image(path: str | os.PathLike, fix: str = REPLACE_OR_REMOVE) -> Iterator[Image.Image]:
    """`Image.open(path)`, lazily decoded, with every failure (in the block too) as a DataError.

    The error names the file and says `fix`. A file that holds none of FORMATS, or several
    frames (see the module's docstring), is refused. An image with more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS` is refused with a sentence saying how to raise the limit.
    Pillow raises only above twice the limit and warns in between, a warning that scrolls
    away while training goes on; so every call makes sure that a warnings filter turns Pillow's
    `DecompressionBombWarning` into an error in this process (a lasting filter: the threads
    that decode PASCAL masks would race on `warnings.catch_warnings`, which is not thread-safe).
    """
    if _REFUSE_BOMB_WARNINGS not in warnings.filters:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    try:
        with Image.open(path, formats=FORMATS) as im:
            if getattr(im, "is_animated", False) and im.format != "MPO":
                raise DataError(
                    f"Image {path} holds {im.n_frames} frames (an animation or a multi-page "
                    "file), and which one is the image is not known; save that frame as a "
                    "still image, or remove the file."
                )
            yield im
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(_too_many_pixels(path, err)) from None
    except UnidentifiedImageError:
        kinds = "PNG, JPEG, BMP, GIF, TIFF, WebP or PPM/PGM"
        raise DataError(f"Cannot read image {path}: it is no {kinds} image; {fix}.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"Cannot read image {path} ({err}); {fix}.") from None


def _too_many_pixels(path: str | os.PathLike, err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow's "Image size (N pixels) ..."
    size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
    return (
        f"Image {path} has {size}, over Pillow's limit PIL.Image.MAX_IMAGE_PIXELS = "
        f"{Image.MAX_IMAGE_PIXELS:,} (a guard against decompression bombs); downscale it, or, "
        "if you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS (None: no limit) in the "
        "script, before the data is read."
    )


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a file's name makes it an image here: a suffix of IMAGE_SUFFIXES (any case),
    not hidden (hidden files include macOS "._001.png" resource forks, which are not images)."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> list[Path]:
    """The image files of `folder` (`is_image_file`), sorted by name; other files are skipped."""
    return sorted(p for p in Path(folder).iterdir() if is_image_file(p) and p.is_file())


def image_size(path: str | os.PathLike, fix: str = REPLACE_OR_REMOVE) -> tuple[int, int]:
    """(width, height) in pixels of the image `open_rgb` gives (its EXIF orientation applied),
    from the file's header: nothing is decoded, except a PNG, whose EXIF data may follow its
    pixels."""
    with open_image(path, fix) as im:
        w, h = im.size
        turned = im.getexif().get(ExifTags.Base.Orientation) in _TURNED
        return (h, w) if turned else (w, h)


def open_rgb(path: str | os.PathLike, fix: str = REPLACE_OR_REMOVE) -> Image.Image:
    """The image file at `path`, decoded, turned by its EXIF orientation, as an 8-bit RGB PIL
    image (see `to_rgb`): how every image of the repository is read.

    DataError naming the file when it cannot be decoded (saying `fix`), is refused by
    `open_image` or has a pixel format with no 8-bit reading (32-bit float, or integers above
    65,535).
    """
    with open_image(path, fix) as im:
        ImageOps.exif_transpose(im, in_place=True)  # decodes now, while the file is open
        return to_rgb(im, source=path)


def to_rgb(image: Image.Image, source: str | os.PathLike | None = None) -> Image.Image:
    """`image` as 8-bit RGB; an RGB image is returned as it is (no copy).

    Grey, palette, CMYK and alpha images are converted as Pillow converts them (alpha is
    dropped). 16-bit grey images (modes "I;16*", and "I", the mode of 32-bit integer TIFFs
    and of 16-bit PNGs in older Pillow versions) are scaled to 8 bits, value >> 8
    (257 * v -> v, 65,535 -> 255); Pillow's own convert("RGB") would clip every value above
    255, i.e. turn a 16-bit photo white. 16-bit RGB(A) PNGs need nothing here: Pillow reads
    them as 8-bit RGB(A) already, with the same scaling. `source` (a file name) only serves
    the error message.
    """
    if image.mode == "RGB":
        return image
    what = f"Image {source}" if source else "An image"
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(
                f"{what} holds {image.mode!r} values from {values.min()} to "
                f"{values.max()}, outside the 16-bit range 0..65535; save it with 8 or 16 "
                "bits per channel."
            )
        grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        raise DataError(
            f"{what} holds 32-bit floats (mode 'F'), which have no standard 8-bit "
            "reading; save it with 8 or 16 bits per channel."
        )
    try:
        return image.convert("RGB")
    except ValueError as err:  # e.g. LAB or HSV, which Pillow cannot convert to RGB
        raise DataError(
            f"{what} has the pixel format {image.mode!r}, which cannot be read as "
            f"RGB ({err}); save it as an RGB or grey image."
        ) from None


def reader_args(cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that make a torchvision dataset class which reads image files through a
    `loader` argument (ImageFolder, DatasetFolder, Flowers102, Food101, ...) read them as every
    dataset here does: `loader=open_rgb` and, where the class takes `is_valid_file` and `args`
    give neither it nor `extensions`, `is_valid_file=is_image_file` (the files `list_images`
    lists: GIFs too, hidden files not; torchvision's own list leaves GIFs out silently).
    {} for a class whose `loader` has a default of its own, and when `args` give a loader.
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):  # a class without a readable signature takes nothing here
        return {}
    loader = params.get("loader")
    if loader is None or "loader" in args:
        return {}
    if loader.default not in (inspect.Parameter.empty, default_loader):
        return {}
    extra: dict[str, Any] = {"loader": open_rgb}
    if "is_valid_file" in params and not {"is_valid_file", "extensions"} & set(args):
        extra["is_valid_file"] = is_image_file
    return extra
