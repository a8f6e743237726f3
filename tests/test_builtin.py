"""load_dataset.builtin on tiny MNIST / CIFAR-10 / SVHN files written in torchvision's formats."""

from __future__ import annotations

import hashlib
import inspect
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from load_dataset import builtin
from load_dataset.builtin import TorchvisionClassification, train_val_indices
from load_dataset.errors import DataError
from load_dataset.utils import IMAGENET_MEAN, IMAGENET_STD
from tests.builtin_fixtures import (
    CIFAR10_CLASSES,
    builtin_config,
    make_cifar10,
    write_mnist,
)

REPO = Path(__file__).resolve().parent.parent
MNIST_CLASSES = [
    "0 - zero",
    "1 - one",
    "2 - two",
    "3 - three",
    "4 - four",
    "5 - five",
    "6 - six",
    "7 - seven",
    "8 - eight",
    "9 - nine",
]


@pytest.fixture
def mnist_root(tmp_path):
    """(root, written arrays) of a tiny MNIST: 60 train, 20 test images."""
    return tmp_path / "tv-data", write_mnist(tmp_path / "tv-data")


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """(root, written arrays) of a tiny CIFAR-10: 60 train, 20 test images."""
    return tmp_path / "tv-data", make_cifar10(tmp_path / "tv-data", monkeypatch)


def source_index(image_id: str) -> int:
    return int(image_id.split("/")[1])


# ------------------------------------------------------------------ the validation carve


def test_carve_sizes_disjoint_covering_and_seeded():
    train, val = train_val_indices(60, 0.1, split_seed=0)
    assert (len(train), len(val)) == (54, 6)
    assert set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(60))
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again_train, again_val = train_val_indices(60, 0.1, split_seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    assert not np.array_equal(val, train_val_indices(60, 0.1, split_seed=1)[1])
    # Rounded to whole images: 0.25 * 60 = 15, 0.33 * 20 = 6.6 -> 7, 0.29 * 100 = 28.999... -> 29
    sizes = [len(train_val_indices(n, f, 0)[1]) for n, f in [(60, 0.25), (20, 0.33), (100, 0.29)]]
    assert sizes == [15, 7, 29]


@pytest.mark.parametrize("n, fraction", [(60, 0.0), (60, 1.0), (60, -0.1), (5, 0.05), (2, 0.9)])
def test_carve_rejects_fractions_that_leave_a_split_empty(n, fraction):
    with pytest.raises(DataError, match="val_fraction"):
        train_val_indices(n, fraction, 0)


# ------------------------------------------------------------------ MNIST


def test_mnist_splits_sizes_ids_and_split_info(mnist_root):
    root, _ = mnist_root
    sets = {
        s: TorchvisionClassification(s, name="MNIST", root=str(root))
        for s in ("train", "val", "test")
    }
    assert {s: len(ds) for s, ds in sets.items()} == {"train": 54, "val": 6, "test": 20}
    train_ids, val_ids = set(sets["train"].image_ids), set(sets["val"].image_ids)
    assert train_ids.isdisjoint(val_ids)
    assert train_ids | val_ids == {f"train/{i:06d}" for i in range(60)}
    assert sets["test"].image_ids == [f"test/{i:06d}" for i in range(20)]
    # The same carve as train_val_indices with the default fraction and seed.
    expected_val = train_val_indices(60, 0.1, 0)[1]
    assert sets["val"].image_ids == [f"train/{i:06d}" for i in expected_val]
    assert sets["train"].split_info == {
        "dataset": "MNIST",
        "source_split": "train",
        "source_size": 60,
        "size": 54,
        "val_fraction": 0.1,
        "split_seed": 0,
    }
    assert sets["val"].split_info["size"] == 6
    assert sets["test"].split_info == {
        "dataset": "MNIST",
        "source_split": "test",
        "source_size": 20,
        "size": 20,
    }
    other_seed = TorchvisionClassification("val", name="MNIST", root=str(root), split_seed=1)
    assert other_seed.image_ids != sets["val"].image_ids
    assert other_seed.split_info["split_seed"] == 1


def test_mnist_samples_one_hot_grayscale_to_three_channels(mnist_root):
    root, written = mnist_root
    ds = TorchvisionClassification("val", name="MNIST", root=str(root))
    assert ds.label_meanings == MNIST_CLASSES
    assert ds.labels.dtype == np.float32 and ds.labels.shape == (6, 10)
    assert ds.mean_std == (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
    for i in range(len(ds)):
        sample = ds[i]
        k = source_index(ds.image_ids[i])
        raw_label = written["train"]["labels"][k]
        expected = torch.zeros(10)
        expected[raw_label] = 1.0
        assert torch.equal(sample["label"], expected) and sample["label"].dtype == torch.float32
        assert np.array_equal(ds.labels[i], expected.numpy())
        assert sample["img_idx"] == i
        x = sample["data"]
        assert x.dtype == torch.uint8 and x.shape == (3, 28, 28)
        raw = torch.from_numpy(written["train"]["images"][k])
        assert all(torch.equal(x[c], raw) for c in range(3))
        assert int(x[0, 0, 0]) == k  # the fixture's index pixel


def test_mnist_one_channel_keeps_it_with_half_stats(mnist_root):
    root, written = mnist_root
    ds = TorchvisionClassification("test", name="MNIST", root=str(root), channels=1)
    x = ds[3]["data"]
    assert x.shape == (1, 28, 28)
    assert torch.equal(x[0], torch.from_numpy(written["test"]["images"][3]))
    assert ds.mean_std == ((0.5,), (0.5,))
    assert int(ds.labels[3].argmax()) == written["test"]["labels"][3]


def test_normalization_choices(mnist_root):
    root, _ = mnist_root
    half = TorchvisionClassification("test", name="MNIST", root=str(root), normalization="half")
    assert half.mean_std == ((0.5,) * 3, (0.5,) * 3)
    none = TorchvisionClassification("test", name="MNIST", root=str(root), normalization="none")
    assert none.mean_std == ((0.0,) * 3, (1.0,) * 3)
    with pytest.raises(DataError, match="channels = 3"):
        TorchvisionClassification(
            "test", name="MNIST", root=str(root), channels=1, normalization="imagenet"
        )
    with pytest.raises(DataError, match="'zscore' is not one of"):
        TorchvisionClassification("test", name="MNIST", root=str(root), normalization="zscore")
    with pytest.raises(DataError, match="channels must be 1 or 3"):
        TorchvisionClassification("test", name="MNIST", root=str(root), channels=2)


def test_image_size_resizes(mnist_root):
    root, _ = mnist_root
    square = TorchvisionClassification("test", name="MNIST", root=str(root), image_size=16)
    assert square[0]["data"].shape == (3, 16, 16) and square[0]["data"].dtype == torch.uint8
    rect = TorchvisionClassification("test", name="MNIST", root=str(root), image_size=[20, 24])
    assert rect[0]["data"].shape == (3, 20, 24)
    with pytest.raises(DataError, match="image_size"):
        TorchvisionClassification("test", name="MNIST", root=str(root), image_size=[0, 5])


def test_fashion_mnist_reads_its_own_folder_and_names(tmp_path):
    write_mnist(tmp_path, folder="FashionMNIST")
    ds = TorchvisionClassification("test", name="FashionMNIST", root=str(tmp_path))
    assert len(ds) == 20 and ds.label_meanings[0] == "T-shirt/top"


def test_batches_normalize_on_the_device_with_mean_std(mnist_root):
    from src.train.loop import BatchPrep

    root, written = mnist_root
    ds = TorchvisionClassification("test", name="MNIST", root=str(root))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["data"].shape == (4, 3, 28, 28) and batch["label"].shape == (4, 10)
    x, y = BatchPrep(ds, torch.device("cpu"), channels_last=False)(batch)
    raw = torch.from_numpy(written["test"]["images"][:4]).float() / 255
    for c in range(3):
        expected = (raw - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(x[:, c], expected, atol=1e-6)


# ------------------------------------------------------------------ CIFAR-10


def test_cifar10_splits_labels_and_images(cifar10_root):
    root, written = cifar10_root
    sets = {
        s: TorchvisionClassification(s, name="CIFAR10", root=str(root))
        for s in ("train", "val", "test")
    }
    assert {s: len(ds) for s, ds in sets.items()} == {"train": 54, "val": 6, "test": 20}
    assert sets["train"].label_meanings == CIFAR10_CLASSES
    for setname, ds in sets.items():
        source = "test" if setname == "test" else "train"
        for i in (0, len(ds) - 1):
            k = source_index(ds.image_ids[i])
            sample = ds[i]
            assert int(sample["label"].argmax()) == written[source]["labels"][k]
            assert sample["label"].sum() == 1.0
            raw_chw = torch.from_numpy(written[source]["images"][k]).permute(2, 0, 1)
            assert torch.equal(sample["data"], raw_chw)
    labels = sets["test"].labels
    assert np.array_equal(labels.argmax(1), written["test"]["labels"])
    assert labels.sum() == 20.0


def test_cifar10_one_channel_is_luma(cifar10_root):
    root, written = cifar10_root
    ds = TorchvisionClassification("test", name="CIFAR10", root=str(root), channels=1)
    x = ds[0]["data"]
    assert x.shape == (1, 32, 32) and x.dtype == torch.uint8
    r, g, b = (written["test"]["images"][0][..., c].astype(float) for c in range(3))
    luma = 0.2989 * r + 0.587 * g + 0.114 * b
    assert np.abs(x[0].numpy().astype(float) - luma).max() <= 1.0


# ------------------------------------------------------------------ SVHN (no `classes`)


def test_svhn_labels_are_digits_and_ten_means_zero(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import SVHN

    n = 12
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # SVHN's .mat layout
    y = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1], dtype=np.uint8)  # 10 is the digit 0
    md5 = {}
    for split in ("train", "test"):
        path = tmp_path / f"{split}_32x32.mat"
        savemat(path, {"X": images, "y": y[:, None]})
        md5[split] = hashlib.md5(path.read_bytes()).hexdigest()
    # torchvision checks the real files' md5; point it at these files (as for CIFAR-10).
    patched = {s: [u, f, md5.get(s, m)] for s, (u, f, m) in SVHN.split_list.items()}
    monkeypatch.setattr(SVHN, "split_list", patched)
    ds = TorchvisionClassification("test", name="SVHN", root=str(tmp_path))
    assert ds.label_meanings == [str(d) for d in range(10)]
    assert list(ds.labels.argmax(1)) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    x = ds[5]["data"]
    assert torch.equal(x, torch.from_numpy(images[..., 5]).permute(2, 0, 1))


# ------------------------------------------------------------------ other torchvision classes


class ToyFolderSet(torch.utils.data.Dataset):
    """A torchvision-like class without an in-memory array: PIL images, split=, `_labels`."""

    def __init__(self, root, split="train", transform=None, target_transform=None, download=False):
        from PIL import Image

        n = 8 if split == "train" else 4
        self._labels = [i % 3 for i in range(n)]
        self.images = [Image.new("L", (5, 7), color=10 * i) for i in range(n)]
        self.transform, self.target_transform = transform, target_transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self._labels[i]


def test_other_classes_go_through_pil_with_numbered_classes(monkeypatch):
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "ToyFolderSet", ToyFolderSet, raising=False)
    ds = TorchvisionClassification("val", name="ToyFolderSet", root="unused", val_fraction=0.25)
    assert len(ds) == 2 and ds.label_meanings == ["0", "1", "2"]
    k = source_index(ds.image_ids[1])
    sample = ds[1]
    assert sample["data"].shape == (3, 7, 5)
    assert torch.equal(sample["data"], torch.full((3, 7, 5), 10 * k, dtype=torch.uint8))
    assert int(sample["label"].argmax()) == k % 3


# ------------------------------------------------------------------ user errors


def test_unknown_setname_is_a_value_error(mnist_root):
    with pytest.raises(ValueError, match="'valid' is not one of train, val, test"):
        TorchvisionClassification("valid", name="MNIST", root=str(mnist_root[0]))


@pytest.mark.parametrize(
    "name, match",
    [
        ("NoSuchSet", "Unknown torchvision dataset name 'NoSuchSet'; supported are MNIST, "),
        ("cifar10", r"did you mean 'CIFAR10'\?"),
        ("ImageFolder", "takes neither train= nor split="),
    ],
)
def test_unknown_name_lists_the_supported_ones(tmp_path, name, match):
    with pytest.raises(DataError, match=match) as e:
        TorchvisionClassification("train", name=name, root=str(tmp_path))
    for known in ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", "SVHN", "STL10"):
        assert known in str(e.value)


def test_missing_files_name_the_root_and_download_true(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as e:
        TorchvisionClassification("train", name="CIFAR10", root=str(root))
    text = str(e.value)
    assert str(root) in text and "download = true" in text and "\n" not in text
    assert f"{root}/cifar-10-batches-py/" in text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["CIFAR10", "MNIST"])
def test_offline_download_is_one_clear_error(tmp_path, monkeypatch, name):
    from torchvision.datasets import CIFAR10, MNIST

    # A port nobody listens on: no request leaves this machine, as when offline.
    base = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setattr(CIFAR10, "url", base + CIFAR10.filename)
    monkeypatch.setattr(MNIST, "mirrors", [base])
    root = tmp_path / "tv-data"
    start = time.monotonic()
    with pytest.raises(DataError) as e:
        TorchvisionClassification("train", name=name, root=str(root), download=True)
    assert time.monotonic() - start < 60  # refused at once, not retried for minutes
    text = str(e.value)
    assert text.startswith(f"Could not download {name} into the root folder {root} (")
    assert "data_README.md" in text and "download = false" in text and "\n" not in text


def test_a_server_that_never_answers_times_out(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(builtin, "DOWNLOAD_TIMEOUT_S", 0.5)
    with socket.socket() as server:  # accepts connections (backlog), never replies
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{server.getsockname()[1]}/c.tgz")
        start = time.monotonic()
        with pytest.raises(DataError, match="Could not download CIFAR10"):
            TorchvisionClassification("train", name="CIFAR10", root=str(tmp_path), download=True)
        assert time.monotonic() - start < 20  # the 0.5 s timeout, not the 30 s one or none
    assert socket.getdefaulttimeout() is None  # restored for the rest of the process


def test_download_true_with_files_present_reads_them_without_network(cifar10_root, monkeypatch):
    from torchvision.datasets import CIFAR10

    root, _ = cifar10_root
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{_closed_port()}/c.tgz")
    ds = TorchvisionClassification("val", name="CIFAR10", root=str(root), download=True)
    assert len(ds) == 6


# ------------------------------------------------------------------ configs


def test_cifar10_experiment_config():
    import src.config as cfg

    c = cfg.load(REPO / "experiments" / "cifar10_tinyconv.toml")
    assert c.data.dataset == "load_dataset.builtin:TorchvisionClassification"
    assert c.data.problem == "multiclass"
    assert c.data.args["name"] == "CIFAR10"
    assert c.data.args["root"] == str(REPO / "data")  # resolved against the repo, not the cwd
    assert c.model.args == {"n_outputs": 10}
    params = inspect.signature(TorchvisionClassification).parameters
    assert set(c.data.args) <= set(params)


@pytest.mark.parametrize("name", ["MNIST", "CIFAR10"])
def test_fixture_configs_are_valid_experiments(tmp_path, name):
    import tomllib

    import src.config as cfg

    tree = builtin_config(name, tmp_path / "data", tmp_path / "results", epochs=1)
    c = cfg.from_dict(tree)
    assert c.data.args["name"] == name and c.train.epochs == 1
    assert cfg.from_dict(tomllib.loads(cfg.to_toml(c))) == c


@pytest.mark.slow
def test_mnist_experiment_from_the_command_line(
    mlflow_uri, mnist_root, tmp_path, capsys, monkeypatch
):
    from mlflow.tracking import MlflowClient

    import src.config as cfg
    from tests.command_line import run_here

    root, _ = mnist_root
    # TinyConv is built for 32 x 32 inputs: the dataset resizes MNIST's 28 x 28.
    tree = builtin_config("MNIST", root, tmp_path / "results", epochs=2, image_size=32)
    path = tmp_path / "mnist.toml"
    path.write_text(cfg.to_toml(cfg.from_dict(tree)))
    out = run_here(["-m", "src.run_experiment", str(path)], REPO, capsys, monkeypatch)
    assert out.returncode == 0, out.stderr
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("builtin-mnist-test").experiment_id])
    assert run.info.status == "FINISHED"
    # 60 training images, val_fraction 0.1: 54 to train on, 6 to validate on.
    assert (run.data.tags["data.train.count"], run.data.tags["data.val.count"]) == ("54", "6")
    for key in ("val_accuracy", "val_auroc_mean", "train_loss", "val_loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [1, 2], key
    assert 0.0 <= run.data.metrics["val_accuracy"] <= 1.0


def test_cifar10_experiment_runs_in_process(mlflow_uri, cifar10_root, tmp_path):
    from mlflow.tracking import MlflowClient

    import src.config as cfg
    from src.run_experiment import run

    root, _ = cifar10_root  # the md5 patch reaches only this process: no subprocess here
    result = run(cfg.from_dict(builtin_config("CIFAR10", root, tmp_path / "results")))
    metrics = MlflowClient(mlflow_uri).get_run(result.run_id).data.metrics
    assert result.epochs_run == 2
    assert {"val_accuracy", "val_auroc_mean", "best_val_accuracy"} <= set(metrics)
    per_class = {k for k in metrics if k.startswith("val_auroc/")}
    assert per_class <= {f"val_auroc/{c}" for c in CIFAR10_CLASSES} and per_class
