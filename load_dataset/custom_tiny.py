"""TinyData: a folder of small images with one CSV of multi-hot labels (the tutorial's format).

<data_dir>/
    tiny_labels.csv     Filename,LabelRed,LabelBlue,LabelYellow   (any label columns, 0/1;
                        another name or place: labels_csv=, --labels-csv)
    train/*.png         file names as in the CSV's first column
    val/*.png
    test/*.png

Every image has the same size. One CSV serves all splits, so a row whose file is in none of
the three folders is a missing file: an error, or a warning with `missing_files="warn"`.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from load_dataset.errors import DataError
from load_dataset.images import image_size, list_images, open_rgb
from load_dataset.utils import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MeanStd,
    NormalizedInput,
    compute_mean_std,
)

SHIPPED_DATA_DIR = Path(__file__).resolve().parent / "tiny_data"
LABELS_FILE = "tiny_labels.csv"
MEAN_STD_CACHE_FILE = "mean_std_cache.json"
SETNAMES = ("train", "val", "test")
NORMALIZATIONS = ("imagenet", "train_split")
MISSING_FILES = ("error", "warn")
# The decoded images a TinyData keeps in memory at most (see `keep_decoded`).
KEEP_DECODED_BYTES = 512 * 2**20
N_NAMED = 5  # missing files named in a message; the rest are counted


class MissingFilesWarning(UserWarning):
    """The label CSV names files that are not on disk; the data set goes on without them."""


_WARNED: set[str] = set()  # MissingFilesWarning messages given in this process


def read_label_csv(csv_path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Label names (every column after the first) and {file name: float32 [K] 0/1 vector}.

    File names are kept as text, so "001.png" and "0010.png" stay what they are.
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            numbered = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(row)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path} is not a readable CSV file ({err}).") from err
    if not numbered or len(numbered[0][1]) < 2:
        raise DataError(
            f"{csv_path} needs a header row 'Filename,<label 1>,<label 2>,...' and one row "
            "per image."
        )
    header = [cell.strip() for cell in numbered[0][1]]
    label_meanings = header[1:]
    labels: dict[str, np.ndarray] = {}
    for line, row in numbered[1:]:
        if len(row) != len(header):
            raise DataError(
                f"Line {line} of {csv_path} has {len(row)} fields but the header has "
                f"{len(header)}; give every image one 0/1 value per label column."
            )
        name = row[0].strip()
        if name in labels:
            raise DataError(f"{name} appears twice in {csv_path}; keep one row per image.")
        values = pd.to_numeric(row[1:], errors="coerce")  # as float() reads them; NaN if not
        if len(bad := np.flatnonzero(~np.isin(values, (0.0, 1.0)))):
            raise DataError(
                f"The label {label_meanings[bad[0]]} of {name} in {csv_path} is "
                f"{row[1 + bad[0]].strip()!r}; labels must be 0 or 1."
            )
        labels[name] = values.astype(np.float32)
    return label_meanings, labels


def check_missing_files(
    labels_by_name: dict[str, np.ndarray],
    listed: dict[str, list[Path]],
    csv_path: Path,
    data_dir: Path,
    missing_files: str = "error",
) -> None:
    """DataError, or with missing_files='warn' a MissingFilesWarning, when rows of the label
    CSV name files that none of the split folders of `data_dir` (`listed`: split -> its
    images) holds.

    Only when train/, val/ and test/ all exist: without one of them, the rows of its images
    cannot be told from rows whose file is missing (a folder may leave out its test split).
    """
    if set(listed) != set(SETNAMES):
        return
    on_disk = {p.name for paths in listed.values() for p in paths}
    absent = sorted(name for name in labels_by_name if name not in on_disk)
    if not absent:
        return
    more = len(absent) - N_NAMED
    named = ", ".join(absent[:N_NAMED]) + (f" and {more} more" if more > 0 else "")
    what = (
        f"{csv_path} names {len(absent)} file(s) found in none of train/, val/, test/ of {data_dir}"
    )
    if missing_files == "error":
        raise DataError(
            f"{what}: {named}; restore them, delete their rows, or set "
            'data.args.missing_files = "warn" (--set data.args.missing_files=warn) to go on '
            "without them."
        )
    message = f"{what}: {named}; going on without them."
    if message not in _WARNED:  # every split finds the same files: say it once
        _WARNED.add(message)
        warnings.warn(message, MissingFilesWarning, stacklevel=2)


class TinyData(Dataset):
    """One split of a TinyData-format folder (by default the shipped `load_dataset/tiny_data`).

    Args:
        setname: 'train', 'val' or 'test'.
        data_dir: the folder holding the label CSV and `train/`, `val/`, `test/`;
            None means the shipped data next to this module.
        labels_csv: the label CSV; a relative path is taken in `data_dir`.
        normalization: 'imagenet' (the tutorial's ImageNet mean/std) or 'train_split'
            (mean/std of this folder's training images, whatever `setname` is, so that
            validation and test images are normalized as the training images are).
        missing_files: what a CSV row whose file is in none of train/, val/, test/ leads to:
            'error' (a DataError naming the files) or 'warn' (a MissingFilesWarning naming
            them; the data set is the files that are there).
        keep_decoded: keep each sample's decoded, normalized image in memory after its first
            read, so later epochs decode nothing (the shipped data is 1.8 MB so kept; at most
            `KEEP_DECODED_BYTES` per dataset, then the rest is read from disk each time).
            With DataLoader workers each worker keeps its own, for as long as it lives.

    Every image must have the size of the first training image (the first of this split
    when train/ is empty); a sample of another size is a DataError naming both files.

    Attributes:
        label_meanings: the CSV's label column names, e.g. ['LabelRed', 'LabelBlue', ...].
        image_size_wh: (width, height) in pixels that every image must have.
        image_ids: the split's image file names, sorted; sample i is image_ids[i].
        labels: float32 [N, K] 0/1, row i belongs to image_ids[i].
        mean_std: None, because samples are already normalized float tensors.
        input_transform: a decoded RGB image (PIL) -> its sample's `data`; what `__getitem__`
            uses, and what the run's MLflow model applies to the images it is given.

    A sample is {'data': float32 [3, H, W] normalized (H = W = 32 for the shipped data),
    'label': float32 [K], 'img_idx': int}.

    `path_flags` are the command-line flags of its folder arguments, flag -> (argument, help);
    src.cli gives them to the Demos and `python -m src.run_experiment`.
    """

    path_flags: dict[str, tuple[str, str]] = {
        "--data-dir": ("data_dir", "the folder holding the label CSV and train/, val/, test/"),
        "--labels-csv": ("labels_csv", f"the label CSV (default: {LABELS_FILE} in the folder)"),
    }

    def __init__(
        self,
        setname: str,
        data_dir: str | Path | None = None,
        labels_csv: str | Path = LABELS_FILE,
        normalization: str = "imagenet",
        missing_files: str = "error",
        keep_decoded: bool = True,
    ) -> None:
        for name, value, allowed in (
            ("setname", setname, SETNAMES),
            ("normalization", normalization, NORMALIZATIONS),
            ("missing_files", missing_files, MISSING_FILES),
        ):
            if value not in allowed:
                raise DataError(f"Unknown {name} {value!r} for TinyData; use one of {allowed}.")
        self.setname, self.normalization, self.keep_decoded = setname, normalization, keep_decoded
        self.data_dir = SHIPPED_DATA_DIR if data_dir is None else Path(data_dir).expanduser()
        self.split_dir = self.data_dir / setname
        csv_path = self.data_dir / Path(labels_csv).expanduser()  # an absolute one stays
        if not self.data_dir.is_dir():
            raise DataError(
                f"The TinyData folder {self.data_dir} does not exist; pass data_dir= a folder "
                f"holding {labels_csv} and train/, val/, test/."
            )
        if not csv_path.is_file():
            raise DataError(
                f"{csv_path} is missing; TinyData needs one label CSV per folder (give another "
                "with labels_csv=, --labels-csv)."
            )
        if not self.split_dir.is_dir():
            raise DataError(f"The split folder {self.split_dir} is missing; add it with images.")

        # One CSV serves every split: list each split folder there is, once.
        listed = {
            s: list_images(self.data_dir / s) for s in SETNAMES if (self.data_dir / s).is_dir()
        }
        self.image_paths = listed[setname]
        if not self.image_paths:
            raise DataError(f"{self.split_dir} holds no images; add the {setname} images there.")
        self.label_meanings, labels_by_name = read_label_csv(csv_path)
        self.image_ids = [p.name for p in self.image_paths]
        if missing := [name for name in self.image_ids if name not in labels_by_name]:
            raise DataError(
                f"{self.split_dir / missing[0]} has no row in {csv_path} ({len(missing)} "
                "image(s) without one); add a row per image or remove the image."
            )
        check_missing_files(labels_by_name, listed, csv_path, self.data_dir, missing_files)
        self.labels = np.stack([labels_by_name[name] for name in self.image_ids])
        self.mean_std = None  # samples leave here normalized, as float32
        self._decoded: dict[int, torch.Tensor] = {}
        self._decoded_bytes = 0

        # One header read (no decode) here; each sample is then checked against it for free.
        self.size_reference = (listed.get("train") or self.image_paths)[0]
        self.image_size_wh = image_size(self.size_reference)
        self.norm_mean, self.norm_std = self._normalization_stats(listed.get("train", []))
        self.input_transform = NormalizedInput(self.image_size_wh, self.norm_mean, self.norm_std)

    def _normalization_stats(self, train_images: list[Path]) -> MeanStd:
        """ImageNet's mean and std, or those of this folder's training images (cached)."""
        if self.normalization == "imagenet":
            return IMAGENET_MEAN, IMAGENET_STD
        train_dir = self.data_dir / "train"
        if not train_images:
            raise DataError(f"normalization='train_split' needs the images of {train_dir}.")
        mean, std = compute_mean_std(train_images, self.data_dir / MEAN_STD_CACHE_FILE)
        if min(std) == 0:  # dividing by it would turn every image into inf/nan
            raise DataError(
                f"A colour channel is constant over the images in {train_dir}; use "
                "normalization='imagenet'."
            )
        return mean, std

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, idx: int) -> dict:
        data = self._decoded[idx] if idx in self._decoded else self._decode(idx)
        return {"data": data.clone(), "label": torch.tensor(self.labels[idx]), "img_idx": idx}

    def _decode(self, idx: int) -> torch.Tensor:
        path = self.image_paths[idx]
        image = open_rgb(path)
        if image.size != self.image_size_wh:
            (w, h), (ref_w, ref_h) = image.size, self.image_size_wh
            raise DataError(
                f"Image {path} is {w} x {h} pixels (width x height) but TinyData's images are "
                f"all {ref_w} x {ref_h}, as {self.size_reference} is; resize it or remove it "
                "and its CSV row."
            )
        data = self.input_transform(image)
        size = data.numel() * data.element_size()
        if self.keep_decoded and self._decoded_bytes + size <= KEEP_DECODED_BYTES:
            self._decoded[idx] = data
            self._decoded_bytes += size
        return data
