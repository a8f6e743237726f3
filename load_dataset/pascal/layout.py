"""Where the PASCAL VOC 2012 and SBD files lie: find, check, download, list.

The split lists come from torchvision's own loaders (`VOCSegmentation`, `SBDataset`), so
this repository reads exactly the files torchvision would. Every problem a user can fix
(a wrong path, a half-extracted archive, no network for a download) becomes one DataError
that names the path and points to data_README.md.
"""

from __future__ import annotations

import difflib
import os
import socket
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from load_dataset.errors import DataError

README = "data_README.md"
VOC_SUBDIR = Path("VOCdevkit") / "VOC2012"
VOC_PARTS = ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
SBD_PARTS = ("img", "cls", "train_noval.txt")
DOWNLOAD_TIMEOUT_S = 60.0  # a stalled connection fails after this instead of hanging forever


@dataclass(frozen=True)
class Entry:
    """One image of a split: its VOC id, image file, mask file, and 'voc' or 'sbd'."""

    image_id: str
    image_path: str
    mask_path: str
    source: str


def _not_found(what: str, path: Path, expected: str) -> DataError:
    hint = ""
    parent = path.parent
    if not path.exists() and parent.is_dir():
        close = difflib.get_close_matches(path.name, os.listdir(parent), n=1, cutoff=0.6)
        if close:
            hint = f" (did you mean {parent / close[0]}?)"
    return DataError(
        f"{what} not found at {path}{hint}; expected {expected}; see {README} for how to get "
        "the data and lay it out."
    )


def find_voc_root(voc_dataset_dir: str | os.PathLike, download: bool = False) -> Path:
    """The folder that holds VOCdevkit/VOC2012 (torchvision's `root`).

    Accepts that folder, the VOCdevkit folder, or the VOC2012 folder itself (when it lies
    inside a folder named VOCdevkit). With `download`, fetches VOC 2012 into
    `voc_dataset_dir` when it is not there yet.
    """
    given = Path(voc_dataset_dir).expanduser().absolute()
    root = None
    if (given / VOC_SUBDIR).is_dir():
        root = given
    elif given.name == "VOCdevkit" and (given / "VOC2012").is_dir():
        root = given.parent
    elif (given / "JPEGImages").is_dir():
        if given.parent.name != "VOCdevkit":
            raise DataError(
                f"PASCAL VOC 2012 folder {given} must lie inside a folder named VOCdevkit "
                f"(torchvision's layout <root>/{VOC_SUBDIR.as_posix()}); move or link it "
                f"there, see {README}."
            )
        root = given.parent.parent
    if root is not None:
        _check_parts(root / VOC_SUBDIR, VOC_PARTS, "PASCAL VOC 2012")
        return root
    if download:
        download_voc(given)
        _check_parts(given / VOC_SUBDIR, VOC_PARTS, "PASCAL VOC 2012")
        return given
    expected = f"<dir>/{VOC_SUBDIR.as_posix()}/{{{','.join(VOC_PARTS)}}}"
    if not given.is_dir():
        raise _not_found("PASCAL VOC 2012 folder", given, expected)
    tar = given / "VOCtrainval_11-May-2012.tar"
    extract = f" (extract {tar} there first)" if tar.is_file() else ""
    raise DataError(
        f"No {VOC_SUBDIR.as_posix()} under {given}{extract}; expected {expected}; see {README}."
    )


def find_sbd_root(sbd_dataset_dir: str | os.PathLike, download: bool = False) -> Path:
    """The SBD folder that directly holds img/, cls/ and train_noval.txt (torchvision's root).

    With `download`, fetches what is missing: the whole SBD when img/ or cls/ is absent,
    only train_noval.txt when that alone is absent.
    """
    root = Path(sbd_dataset_dir).expanduser()
    expected = f"<dir>/{{{','.join(SBD_PARTS)}}}"
    # Half an SBD (img/ without cls/ or the reverse) is left for the user to fix: torchvision
    # would move the archive's folders inside the existing one.
    half = (root / "img").is_dir() != (root / "cls").is_dir()
    if download and not half and not all((root / p).exists() for p in SBD_PARTS):
        download_sbd(root)
    if not root.is_dir():
        error = str(_not_found("SBD folder", root, expected)).rstrip(".")
        raise DataError(f"{error}; or pass --sbd-dir '' to train on VOC 2012 alone.")
    nested = root / "benchmark_RELEASE" / "dataset"
    if not (root / "cls").is_dir() and nested.is_dir():
        raise DataError(
            f"SBD folder {root} holds benchmark_RELEASE/dataset; pass {nested} as "
            f"sbd_dataset_dir (or move its contents up) and add train_noval.txt, see {README}."
        )
    _check_parts(root, SBD_PARTS, "SBD")
    return root


def _check_parts(folder: Path, parts: tuple[str, ...], name: str) -> None:
    missing = [p for p in parts if not (folder / p).exists()]
    if missing:
        raise DataError(
            f"{name} folder {folder} is incomplete: {', '.join(missing)} missing; "
            f"re-extract the archive or follow {README}."
        )


@contextmanager
def _download_errors(what: str, url: str) -> Iterator[None]:
    """Turns any network or archive failure into one DataError pointing to the manual route."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen sets no timeout
    try:
        yield
    except (OSError, RuntimeError, EOFError, tarfile.TarError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise DataError(
            f"Downloading {what} from {url} failed ({reason}); download it by hand as "
            f"described in {README}."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def download_voc(root: Path) -> None:
    """VOC 2012 trainval (~2 GB tar) into root/VOCdevkit/VOC2012 via torchvision."""
    from torchvision.datasets import VOCSegmentation
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    with _download_errors("PASCAL VOC 2012", DATASET_YEAR_DICT["2012"]["url"]):
        VOCSegmentation(str(root), year="2012", image_set="train", download=True)


def download_sbd(root: Path) -> None:
    """SBD (~1.4 GB) and/or its train_noval.txt into root via torchvision."""
    from torchvision.datasets import SBDataset
    from torchvision.datasets.utils import download_url

    if (root / "img").is_dir() and (root / "cls").is_dir():
        with _download_errors("SBD train_noval.txt", SBDataset.voc_train_url):
            download_url(
                SBDataset.voc_train_url,
                str(root),
                SBDataset.voc_split_filename,
                SBDataset.voc_split_md5,
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    with _download_errors("SBD", SBDataset.url):
        SBDataset(str(root), image_set="train_noval", mode="segmentation", download=True)


def voc_entries(root: Path, image_set: str) -> list[Entry]:
    """VOC 2012 segmentation split 'train' or 'val', as listed by torchvision."""
    from torchvision.datasets import VOCSegmentation

    split_file = root / VOC_SUBDIR / "ImageSets" / "Segmentation" / f"{image_set}.txt"
    if not split_file.is_file():
        raise _not_found("PASCAL VOC 2012 split list", split_file, "a list of image ids")
    voc = VOCSegmentation(str(root), year="2012", image_set=image_set, download=False)
    entries = [
        Entry(Path(img).stem, img, mask, "voc")
        for img, mask in zip(voc.images, voc.masks)
        if Path(img).stem  # a blank line in the list is no image
    ]
    _check_files(entries, split_file)
    return entries


def sbd_entries(root: Path) -> list[Entry]:
    """SBD `train_noval` (the SBD images that are not in VOC 2012 val), as listed by torchvision."""
    from torchvision.datasets import SBDataset

    try:
        sbd = SBDataset(str(root), image_set="train_noval", mode="segmentation", download=False)
    except RuntimeError as e:  # scipy missing
        raise DataError(f"SBD cannot be read: {e}.") from None
    entries = [
        Entry(Path(img).stem, img, mask, "sbd")
        for img, mask in zip(sbd.images, sbd.masks)
        if Path(img).stem
    ]
    _check_files(entries, root / "train_noval.txt")
    return entries


def _check_files(entries: list[Entry], split_file: Path) -> None:
    missing = [p for e in entries for p in (e.image_path, e.mask_path) if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} files listed in {split_file} are missing, e.g. {missing[0]}; "
            f"the data is incomplete: re-extract the archives as described in {README}."
        )
