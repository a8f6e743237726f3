"""Tiny on-disk copies of MNIST and CIFAR-10 in the exact formats torchvision reads.

MNIST: `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`, uncompressed IDX
files (torchvision's MNIST only checks that these four files exist, not their md5).
CIFAR-10: `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`, pickled
dicts as in the real archive. torchvision's CIFAR10 compares every file's md5 with the real
archive's, which tiny files cannot match: `accept_cifar10_files` points those expected md5s
at the written files (pytest's monkeypatch, undone after the test). Nothing else of the
class is changed, so the real loading code runs.

Every image carries its own index in its first pixel (index % 256), so a test can check
that a sample is the image it claims to be. Labels are `raw_labels(n, seed)`.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MNIST_TRAIN, MNIST_TEST = 60, 20
CIFAR_TRAIN, CIFAR_TEST = 60, 20
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def raw_labels(n: int, seed: int) -> np.ndarray:
    """int64 [n] class indices 0..9 of a fixture split (every class occurs when n >= 10)."""
    labels = np.arange(n) % 10
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """uint8 [n, *shape] random images whose first element is the image's index % 256."""
    images = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images.reshape(n, -1)[:, 0] = np.arange(n) % 256
    return images


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: magic 0x00 0x00 <type 0x08 = uint8> <ndim>, then each dim as big-endian uint32.
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(
    root: Path, n_train: int = MNIST_TRAIN, n_test: int = MNIST_TEST, folder: str = "MNIST"
) -> dict[str, Any]:
    """Write a tiny MNIST under `root/<folder>/raw` (folder: MNIST, FashionMNIST or KMNIST).

    Returns {'train': {'images': uint8 [n, 28, 28], 'labels': int64 [n]}, 'test': {...}}.
    """
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, prefix, n, seed in [("train", "train", n_train, 1), ("test", "t10k", n_test, 2)]:
        images, labels = _images(n, (28, 28), seed), raw_labels(n, seed)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
        written[split] = {"images": images, "labels": labels}
    return written


def write_cifar10(
    root: Path, n_train: int = CIFAR_TRAIN, n_test: int = CIFAR_TEST
) -> dict[str, Any]:
    """Write a tiny CIFAR-10 under `root/cifar-10-batches-py` (5 train batches + test batch).

    Returns {'train': {'images': uint8 [n, 32, 32, 3], 'labels': int64 [n]}, 'test': {...},
    'md5': {file name: md5}}. n_train must be a multiple of 5.
    """
    assert n_train % 5 == 0, "CIFAR-10 splits its training images over 5 equal batches"
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {"md5": {}}

    def dump(file_name: str, obj: dict) -> None:
        (folder / file_name).write_bytes(pickle.dumps(obj, protocol=2))
        written["md5"][file_name] = hashlib.md5((folder / file_name).read_bytes()).hexdigest()

    for split, n, seed in [("train", n_train, 3), ("test", n_test, 4)]:
        # The archive stores [n, 3072]: the red plane, then green, then blue, row by row.
        planes = _images(n, (3, 32, 32), seed)
        labels = raw_labels(n, seed)
        written[split] = {"images": planes.transpose(0, 2, 3, 1), "labels": labels}
        if split == "test":
            batches = [("test_batch", slice(0, n))]
        else:
            per = n // 5
            batches = [(f"data_batch_{b + 1}", slice(b * per, (b + 1) * per)) for b in range(5)]
        for file_name, part in batches:
            dump(
                file_name,
                {
                    "batch_label": file_name,
                    "labels": [int(v) for v in labels[part]],
                    "data": planes[part].reshape(-1, 3072),
                    "filenames": [f"img_{i:05d}.png" for i in range(n)[part]],
                },
            )
    dump("batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": n_train // 5})
    return written


def accept_cifar10_files(monkeypatch: pytest.MonkeyPatch, md5: dict[str, str]) -> None:
    """Make torchvision's CIFAR10 accept the fixture files: expect their md5s, not the real ones."""
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{b}", md5[f"data_batch_{b}"]] for b in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})


def make_cifar10(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    n_train: int = CIFAR_TRAIN,
    n_test: int = CIFAR_TEST,
) -> dict[str, Any]:
    """`write_cifar10` + `accept_cifar10_files`: a tiny CIFAR-10 that torchvision loads."""
    written = write_cifar10(root, n_train, n_test)
    accept_cifar10_files(monkeypatch, written["md5"])
    return written


def builtin_config(
    name: str, root: Path, results_dir: Path, epochs: int = 2, **data_args: Any
) -> dict[str, Any]:
    """A complete experiment (the TOML structure, for `src.config.from_dict`) that trains
    TinyConv on the fixture dataset `name` ("MNIST" or "CIFAR10") on the CPU.

    For CIFAR10 the files must come from `make_cifar10` (md5 patch active), and the run must
    stay in this process: the patch does not reach a subprocess or a spawned worker.
    """
    return {
        "run": {
            "experiment_name": f"builtin-{name.lower()}-test",
            "run_name": "tinyconv",
            "task": "train_eval",
            "seed": 0,
            "device": "cpu",
            "results_dir": str(results_dir),
        },
        "data": {
            "dataset": "load_dataset.builtin:TorchvisionClassification",
            "problem": "multiclass",
            "batch_size": 16,
            "num_workers": 0,
            "args": {"name": name, "root": str(root), "val_fraction": 0.1, **data_args},
        },
        "model": {"model": "models.custom_models_base:TinyConv", "args": {"n_outputs": 10}},
        "optimizer": {"name": "SGD", "lr": 1e-3, "momentum": 0.99, "weight_decay": 1e-7},
        "train": {"epochs": epochs, "patience": epochs},
    }
