"""The dataset contract, checked before any training: what a dataset must give the loop.

A dataset built as `Cls(setname, **args)` (or `Cls(**args)` when an argument holds the
placeholder `{setname}`, as torchvision's `ImageFolder(root=...)` wants) must have

- `label_meanings`: a list of K label names (torchvision's `classes` is taken as well);
- samples in one of two forms:
  * this repository's dict: `{'data': Tensor[C,H,W], 'label': FloatTensor[K] multi-hot or an
    int class, 'img_idx': int (optional: the sample's index is used)}`;
  * torchvision's tuple: `(image Tensor[C,H,W], target)`, target an int class or a multi-hot
    vector;
- `mean_std` (per-channel mean and std in [0, 1] units) when its images are uint8, so the loop
  can normalize them on the device.

Optional: `input_transform`, a picklable callable that turns a decoded RGB PIL image into the
`data` of an unaugmented sample (what `__getitem__` itself uses); the run's MLflow model
applies it to the images it is given (src/serve/model_package.py). Without it, a torchvision-style
`transform` serves; with neither, the run logs no MLflow model.

`checked_dataset` looks at the dataset and its first sample and either returns the dataset
(already in the dict form), wraps it in `StandardSamples` (the other accepted forms), or
raises a DataError naming the class, the split, what is wrong and what to add. A split whose
label table (`labels` [N, K], or torchvision's `targets`: see `split_labels`) holds no positive
at all is refused; `label_gaps` names the classes a split has no positive or no negative of.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from load_dataset.errors import DataError


class StandardSamples(Dataset):
    """A dataset whose samples are turned into `{'data', 'label': float [K], 'img_idx'}`.

    Attributes of the wrapped dataset (`image_ids`, `labels`, `mean_std`, ...) are read
    through; `label_meanings` is the wrapped one's, or its `classes`.
    """

    def __init__(self, dataset: Dataset, label_meanings: Sequence[str]) -> None:
        self.dataset = dataset
        self.label_meanings = list(label_meanings)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        sample = self.dataset[idx]
        if isinstance(sample, dict):
            data, label, img_idx = sample["data"], sample["label"], sample.get("img_idx", idx)
        else:
            (data, label), img_idx = sample[:2], idx
        if _is_class_index(label):  # float32 [K]: an integer class as a one-hot vector
            label = F.one_hot(torch.tensor(int(label)), len(self.label_meanings))
        label = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        return {"data": data, "label": label, "img_idx": int(img_idx)}

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found here; "dataset" itself is excluded so that
        # unpickling (in loader workers) does not recurse before it is set.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _is_class_index(label: Any) -> bool:
    """An int (not a bool), or a 0-d integer tensor or array."""
    try:  # a tensor's too: NumPy reads its dtype ("b" for bool)
        return np.ndim(label) == 0 and np.asarray(label).dtype.kind in "iu"
    except (TypeError, ValueError, RuntimeError):  # what NumPy cannot read is no class index
        return False


def checked_dataset(dataset: Any, name: str, split: str, problem: str) -> Dataset:
    """`dataset` if it keeps the contract as it is, wrapped if it keeps it in another accepted
    form; a DataError otherwise. `name` is its import path, `problem` the config's
    'multilabel' or 'multiclass'."""
    where = f"The dataset {name} ('{split}' split)"
    meanings = _label_meanings(dataset, where)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise DataError(f"{where} is not a map-style dataset; give it __len__ and __getitem__.")
    if len(dataset) == 0:
        raise DataError(f"{where} holds no samples; check the folder or split it reads.")
    try:
        sample = dataset[0]
    except DataError:
        raise
    except Exception as e:  # a fork's bug: say where it happened, in one line
        raise DataError(
            f"{where} fails on its first sample: {type(e).__name__}: {' '.join(str(e).split())}."
        ) from None
    data, label = _parts(sample, where)
    _check_image(data, dataset, where)
    class_index = _check_label(label, len(meanings), problem, where)
    as_it_is = isinstance(sample, dict) and "img_idx" in sample and not class_index
    keep = as_it_is and hasattr(dataset, "label_meanings")
    checked = dataset if keep else StandardSamples(dataset, meanings)
    labels = split_labels(checked)
    if labels is not None and not labels.any():
        raise DataError(
            f"{where} has no positive label in any of its {len(labels)} samples: nothing to "
            "learn, and no AUROC or AP to measure; check the labels it reads."
        )
    return checked


def check_same_labels(datasets: dict[str, Any], name: str) -> None:
    """DataError unless every split has the train split's label_meanings, in its order: a
    label vector means the same classes in every split (ImageFolder takes its classes from
    the folders of each split)."""
    train = list(datasets["train"].label_meanings)
    for split, ds in datasets.items():
        if (theirs := list(ds.label_meanings)) != train:
            raise DataError(
                f"The dataset {name} ('{split}' split) has the labels {theirs} but the train "
                f"split has {train}; every split needs the same labels in the same order "
                "(ImageFolder: a folder for every class, empty ones with [data.args] "
                "allow_empty = true)."
            )


def split_labels(dataset: Any) -> np.ndarray | None:
    """A checked split's labels, float [N, K] 0/1, from the table the dataset keeps, without
    reading a sample: `labels` (this repository's datasets) or torchvision's `targets` (N
    integer classes: ImageFolder, the built-in datasets); None without one that fits."""
    k, table = len(dataset.label_meanings), getattr(dataset, "labels", None)
    try:
        if table is None and (targets := getattr(dataset, "targets", None)) is not None:
            classes = np.asarray(targets, dtype=np.int64)
            table = np.eye(k)[classes] if classes.min(initial=0) >= 0 else None  # one-hot
        labels = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError, IndexError):  # not a label table
        return None
    return labels if labels.shape == (len(dataset), k) else None


def label_gaps(dataset: Any) -> dict[str, list[str]] | None:
    """{'positive': the classes of a checked split with no positive, 'negative': those with no
    negative}: their AUROC and AP are undefined (NaN) and the metric means leave them out.
    None without a label table (`split_labels`)."""
    if (labels := split_labels(dataset)) is None:
        return None
    positives = (labels > 0.5).sum(axis=0)
    pairs = list(zip(dataset.label_meanings, positives))
    return {
        "positive": [m for m, n in pairs if n == 0],
        "negative": [m for m, n in pairs if n == len(labels)],
    }


def gaps_note(dataset: Any, split: str) -> str | None:
    """The note a run starts with when `label_gaps` finds classes in an evaluated split."""
    if not (gaps := label_gaps(dataset)) or not any(gaps.values()):
        return None
    named = " and ".join(f"no {kind} of {', '.join(c)}" for kind, c in gaps.items() if c)
    k = len(dataset.label_meanings)
    return (
        f"Note: the {split} split has {named}: AUROC and AP are undefined there, so "
        f"{split}_auroc_mean and {split}_ap_mean are means over "
        f"{k - sum(map(len, gaps.values()))} of {k} classes."
    )


def _label_meanings(dataset: Any, where: str) -> list[str]:
    meanings = getattr(dataset, "label_meanings", getattr(dataset, "classes", None))
    meanings = [] if meanings is None else list(meanings)
    if not meanings or not all(isinstance(m, str) for m in meanings):
        what = f"label_meanings {meanings[:5]!r}" if meanings else "no label_meanings"
        raise DataError(
            f"{where} has {what}; add `self.label_meanings = [...]`, one name (a string) per "
            "label, in the order of the label vector."
        )
    return meanings


def _parts(sample: Any, where: str) -> tuple[Any, Any]:
    """(data, label) of a first sample, a dict or a tuple."""
    if isinstance(sample, dict):
        if missing := [k for k in ("data", "label") if k not in sample]:
            raise DataError(
                f"{where} returns a dict without {' and '.join(repr(k) for k in missing)}; "
                "return {'data': image tensor [C,H,W], 'label': label vector, 'img_idx': index}."
            )
        return sample["data"], sample["label"]
    if isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[0], sample[1]
    raise DataError(
        f"{where} returns a {type(sample).__name__}; return a dict {{'data': image tensor "
        "[C,H,W], 'label': label vector, 'img_idx': index}} or a tuple (image tensor, target)."
    )


def _check_image(data: Any, dataset: Any, where: str) -> None:
    if not isinstance(data, torch.Tensor):
        raise DataError(
            f"{where} returns images as {type(data).__name__}, not tensors; add a transform "
            "that makes tensors (e.g. torchvision.transforms.ToTensor() and Normalize)."
        )
    if data.ndim != 3:
        raise DataError(
            f"{where} returns an image of shape {list(data.shape)}; images must be [C, H, W]."
        )
    if data.dtype == torch.uint8 and getattr(dataset, "mean_std", None) is None:
        raise DataError(
            f"{where} returns uint8 images but has no mean_std; add `self.mean_std = "
            "(mean, std)` (per channel, in [0, 1] units) so the loop can normalize them, or "
            "return normalized float tensors."
        )
    if data.dtype != torch.uint8 and not data.dtype.is_floating_point:
        raise DataError(f"{where} returns {data.dtype} images; return float32 or uint8 tensors.")


def _check_label(label: Any, n_labels: int, problem: str, where: str) -> bool:
    """Whether `label` is an integer class (True) or a multi-hot vector (False)."""
    if _is_class_index(label):
        if problem != "multiclass":
            raise DataError(
                f'{where} gives an integer class label; set [data] problem = "multiclass" '
                "(softmax over the classes), or return a multi-hot vector for a multi-label task."
            )
        if not 0 <= int(label) < n_labels:
            raise DataError(
                f"{where} gives the class {int(label)} but has {n_labels} label_meanings; "
                "class indices must run from 0 to len(label_meanings) - 1."
            )
        return True
    try:
        vector = np.asarray(label, dtype=np.float64)
    except (TypeError, ValueError):
        vector = np.empty((0, 0))  # no vector: said below
    if vector.ndim != 1:
        raise DataError(
            f"{where} gives the label {label!r:.60}; give a multi-hot vector of length "
            f"{n_labels} (one entry per label_meanings) or an integer class."
        )
    if len(vector) != n_labels:
        raise DataError(
            f"{where} gives a label vector of length {len(vector)} but has {n_labels} "
            "label_meanings; they must match."
        )
    if len(other := vector[~np.isin(vector, (0.0, 1.0))]):
        raise DataError(
            f"{where} gives a label vector with values other than 0 and 1 ({other[0]}); labels "
            "must be multi-hot."
        )
    return False
