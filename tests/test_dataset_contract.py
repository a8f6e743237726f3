"""The dataset contract: checked on the first sample before training, with one-line errors,
and torchvision's conventions accepted as they are."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import src.config as cfg
from load_dataset.builtin import TorchvisionClassification
from load_dataset.custom_pascal import PascalVOC2012
from load_dataset.custom_tiny import TinyData
from load_dataset.errors import DataError
from load_dataset.generators.pascal_tree import make_pascal_tree
from load_dataset.pascal.labels import return_label_names
from src.errors import ConfigError
from src.train.build import check_input, train_drop_last
from src.train.dataset_contract import (
    StandardSamples,
    check_same_labels,
    checked_dataset,
    label_gaps,
    split_labels,
)
from src.train.loop import BatchPrep
from tests.builtin_fixtures import write_mnist
from tests.contract_data import ListDataset
from tests.tiny_fixtures import write_png, write_tiny_folder

IMG = torch.zeros(3, 4, 4)
IMG32 = torch.zeros(3, 32, 32)  # what TinyConv takes
NAMES = ["cat", "dog", "fish"]


def check(ds, problem="multilabel"):
    return checked_dataset(ds, "my.module:MyData", "train", problem)


def test_a_dataset_in_the_dict_form_is_returned_as_it_is():
    ds = ListDataset([{"data": IMG, "label": torch.tensor([0.0, 1.0, 0.0]), "img_idx": 0}])
    ds.label_meanings = NAMES
    assert check(ds) is ds


def test_torchvision_tuples_with_an_integer_class_become_one_hot_dicts():
    ds = ListDataset([(IMG, 2), (IMG + 1, 0)], classes=NAMES)
    out = check(ds, "multiclass")
    assert isinstance(out, StandardSamples) and out.label_meanings == NAMES
    second = out[1]
    assert second["label"].tolist() == [1.0, 0.0, 0.0]
    assert second["label"].dtype == torch.float32
    assert second["img_idx"] == 1 and torch.equal(second["data"], IMG + 1)
    assert out[0]["label"].tolist() == [0.0, 0.0, 1.0]


def test_tuples_with_a_multi_hot_target_and_dicts_without_img_idx():
    tuples = ListDataset([(IMG, np.array([1, 0, 1]))], label_meanings=NAMES)
    assert check(tuples)[0]["label"].tolist() == [1.0, 0.0, 1.0]
    dicts = ListDataset([{"data": IMG, "label": [0, 1, 0]}] * 3, label_meanings=NAMES)
    assert [check(dicts)[i]["img_idx"] for i in range(3)] == [0, 1, 2]


def test_an_integer_class_in_the_dict_form_and_as_a_0d_tensor():
    ds = ListDataset([{"data": IMG, "label": torch.tensor(1), "img_idx": 7}], label_meanings=NAMES)
    sample = check(ds, "multiclass")[0]
    assert sample["label"].tolist() == [0.0, 1.0, 0.0] and sample["img_idx"] == 7


def test_the_wrapper_reads_through_and_survives_pickling_for_loader_workers():
    ds = ListDataset([(IMG, 1)], classes=NAMES, image_ids=["a.png"], mean_std=None)
    out = check(ds, "multiclass")
    assert out.image_ids == ["a.png"]
    again = pickle.loads(pickle.dumps(out))
    assert again.label_meanings == NAMES and again[0]["label"].tolist() == [0.0, 1.0, 0.0]


BROKEN = {
    "no label_meanings": (
        ListDataset([(IMG, 0)]),
        "multiclass",
        "has no label_meanings; add `self.label_meanings",
    ),
    "a PIL image": (
        ListDataset([(Image.new("RGB", (4, 4)), 0)], classes=NAMES),
        "multiclass",
        "returns images as Image, not tensors; add a transform",
    ),
    "uint8 without mean_std": (
        ListDataset([(IMG.to(torch.uint8), 0)], classes=NAMES),
        "multiclass",
        "returns uint8 images but has no mean_std",
    ),
    "an integer class in a multilabel task": (
        ListDataset([(IMG, 1)], classes=NAMES),
        "multilabel",
        'set [data] problem = "multiclass"',
    ),
    "a class beyond the labels": (
        ListDataset([(IMG, 3)], classes=NAMES),
        "multiclass",
        "gives the class 3 but has 3 label_meanings",
    ),
    "a label vector of another length": (
        ListDataset([(IMG, [0, 1])], label_meanings=NAMES),
        "multilabel",
        "label vector of length 2 but has 3 label_meanings",
    ),
    "a label that is not 0/1": (
        ListDataset([(IMG, [0, 2, 0])], label_meanings=NAMES),
        "multilabel",
        "values other than 0 and 1 (2.0)",
    ),
    "an image without channels": (
        ListDataset([(torch.zeros(4, 4), 0)], classes=NAMES),
        "multiclass",
        "image of shape [4, 4]; images must be [C, H, W]",
    ),
    "a dict without label": (
        ListDataset([{"data": IMG}], label_meanings=NAMES),
        "multilabel",
        "returns a dict without 'label'",
    ),
    "no samples": (ListDataset([], label_meanings=NAMES), "multilabel", "holds no samples"),
    "a sample that raises": (
        ListDataset([None], label_meanings=NAMES),
        "multilabel",
        "returns a NoneType",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_dataset_is_one_sentence_naming_class_split_and_fix(case):
    ds, problem, needle = BROKEN[case]
    with pytest.raises(DataError) as e:
        check(ds, problem)
    text = str(e.value)
    assert text.startswith("The dataset my.module:MyData ('train' split)")
    assert needle in text and "\n" not in text


@pytest.mark.parametrize(
    ("n_images", "world_size", "batch_size", "drops"),
    [
        (9, 1, 16, False),  # the tutorial's TinyData: one batch of 9, not zero batches
        (16, 1, 16, True),  # exactly one full batch: nothing to drop
        (20, 1, 16, True),  # one full batch; the 4 left over are dropped
        (9, 2, 4, True),  # 4 per process after trimming to a multiple of 2
        (9, 2, 16, False),
    ],
)
def test_the_last_partial_batch_is_dropped_only_after_a_full_one(
    n_images, world_size, batch_size, drops
):
    assert train_drop_last(n_images, world_size, batch_size) is drops


def test_fewer_training_images_than_processes_is_an_error():
    with pytest.raises(DataError, match="1 image\\(s\\) for 2 processes"):
        train_drop_last(1, 2, 16)


def test_a_fork_in_torchvisions_tuple_form_trains_exactly_as_the_dict_form(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from src.run_experiment import run
    from tests.test_run_experiment import all_series, tiny_config

    client = MlflowClient(mlflow_uri)
    common = {"train.epochs": 2, "data.num_workers": 0}
    dicts = run(tiny_config(tmp_path, **common, **{"run.run_name": "dict"}))
    tuples = run(
        tiny_config(
            tmp_path,
            **common,
            **{"run.run_name": "tuple", "data.dataset": "tests.contract_data:TupleTinyData"},
        )
    )
    assert all_series(client, tuples.run_id) == all_series(client, dicts.run_id)


def test_integer_classes_without_img_idx_train_as_a_multiclass_task(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from src.run_experiment import run
    from tests.test_run_experiment import tiny_config

    result = run(
        tiny_config(
            tmp_path,
            **{
                "train.epochs": 2,
                "data.dataset": "tests.contract_data:IntClassTinyData",
                "data.problem": "multiclass",
            },
        )
    )
    metrics = MlflowClient(mlflow_uri).get_run(result.run_id).data.metrics
    assert 0.0 <= metrics["val_accuracy"] <= 1.0 and metrics["train_loss"] > 0
    names = (result.results_dir / "tables" / "val_predictions.csv").read_text().splitlines()
    assert len(names) == 1 + 50  # every val image predicted once, by its index


# ------------------------------------------------ label tables: what the means are over


def dicts(vectors: list[list[int]], **attributes) -> ListDataset:
    samples = [{"data": IMG, "label": torch.tensor(y, dtype=torch.float32)} for y in vectors]
    return ListDataset(samples, label_meanings=NAMES, **attributes)


def image_folder(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png, `counts[class]` images of 8 x 8 (0: an empty folder)."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_png(root / name / f"{i}.png", np.full((8, 8, 3), 10 * i))
    return root


def listed(tmp_path: Path):
    # cat in both samples (no negative), dog in one, fish in none (no positive).
    table = [[1, 0, 0], [1, 1, 0]]
    return dicts(table, labels=np.array(table)), {"positive": ["fish"], "negative": ["cat"]}


def tiny_data(tmp_path: Path):
    splits = {"train": {"a.png": (1, 0, 1)}, "val": {"b.png": (1, 1, 0), "c.png": (1, 0, 0)}}
    root = write_tiny_folder(tmp_path / "tiny", splits)
    expected = {"positive": ["LabelYellow"], "negative": ["LabelRed"]}
    return TinyData("val", data_dir=root), expected


def imagefolder(tmp_path: Path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    root = image_folder(tmp_path / "val", {"blue": 2, "green": 0, "red": 1})
    dataset = ImageFolder(str(root), transform=ToTensor(), allow_empty=True)
    return dataset, {"positive": ["green"], "negative": []}


def pascal(tmp_path: Path):
    # The tree's val split: a bird (class 3) in one image, a tv_monitor (20) in the other.
    tree = make_pascal_tree(tmp_path / "pascal")
    dataset = PascalVOC2012("val", tree.voc_dir, tree.sbd_dir, image_size=32)
    names = return_label_names()
    no_positive = [n for k, n in enumerate(names, start=1) if k not in (3, 20)]
    return dataset, {"positive": no_positive, "negative": []}


def builtin_mnist(tmp_path: Path):
    # 5 test images: the classes 0..4 once each (raw_labels), none of 5..9.
    write_mnist(tmp_path / "mnist", n_test=5)
    dataset = TorchvisionClassification("test", "MNIST", root=str(tmp_path / "mnist"))
    return dataset, {"positive": dataset.label_meanings[5:], "negative": []}


SPLITS_WITH_GAPS = {
    "ListDataset": (listed, "multilabel"),
    "TinyData": (tiny_data, "multilabel"),
    "ImageFolder": (imagefolder, "multiclass"),
    "PascalVOC2012": (pascal, "multilabel"),
    "TorchvisionClassification": (builtin_mnist, "multiclass"),
}


@pytest.mark.parametrize("case", sorted(SPLITS_WITH_GAPS))
def test_the_classes_a_split_has_no_positive_or_no_negative_of_are_named(case, tmp_path):
    make, problem = SPLITS_WITH_GAPS[case]
    dataset, expected = make(tmp_path)
    checked = check(dataset, problem)
    assert label_gaps(checked) == expected
    assert split_labels(checked).shape == (len(dataset), len(checked.label_meanings))


def test_a_dataset_without_a_label_table_that_fits_has_no_gaps_to_tell():
    assert label_gaps(check(dicts([[1, 0, 0]]))) is None
    assert label_gaps(check(dicts([[1, 0, 0]], labels=np.ones((2, 3))))) is None  # 2 rows, 1 sample
    assert label_gaps(check(dicts([[1, 0, 0]], labels=["a.png"]))) is None


def all_zero_listed(tmp_path: Path):
    return dicts([[0, 0, 0], [0, 0, 0]], labels=np.zeros((2, 3))), 2


def all_zero_tiny(tmp_path: Path):
    splits = {"train": {"a.png": (1, 0, 1)}, "val": {"b.png": (0, 0, 0), "c.png": (0, 0, 0)}}
    return TinyData("val", data_dir=write_tiny_folder(tmp_path / "tiny", splits)), 2


def all_zero_pascal(tmp_path: Path):
    tree = make_pascal_tree(tmp_path / "pascal", voc_val={"2008_000010": []})  # background only
    return PascalVOC2012("val", tree.voc_dir, tree.sbd_dir, image_size=32), 1


@pytest.mark.parametrize("make", [all_zero_listed, all_zero_tiny, all_zero_pascal])
def test_a_split_without_a_single_positive_label_is_refused_in_one_line(make, tmp_path):
    dataset, n = make(tmp_path)
    with pytest.raises(DataError) as e:
        check(dataset)
    text = str(e.value)
    assert text.startswith("The dataset my.module:MyData ('train' split) has no positive label")
    assert f"any of its {n} samples" in text and "\n" not in text


def test_a_split_with_other_labels_than_train_is_refused(tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    def split(name: str, counts: dict[str, int]):
        root = image_folder(tmp_path / name, counts)
        return check(ImageFolder(str(root), transform=ToTensor()), "multiclass")

    # val/ without a folder for green: ImageFolder calls red class 1 there, class 2 in train.
    train = split("train", {"blue": 1, "green": 1, "red": 1})
    check_same_labels(
        {"train": train, "val": split("val_ok", {"blue": 1, "green": 1, "red": 1})}, "x:Y"
    )
    with pytest.raises(DataError) as e:
        check_same_labels({"train": train, "val": split("val", {"blue": 1, "red": 1})}, "x:Y")
    assert str(e.value).startswith(
        "The dataset x:Y ('val' split) has the labels ['blue', 'red'] but the train split has "
        "['blue', 'green', 'red']; every split needs the same labels in the same order"
    )
    assert "allow_empty = true" in str(e.value)


# ------------------------------------------------ the model takes the images


class RandomSamples(ListDataset):
    """Each sample draws from torch's, NumPy's and Python's generators, as an augmentation
    does."""

    def __getitem__(self, i: int):
        torch.rand(1), np.random.rand(), random.random()
        return super().__getitem__(i)


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def tiny_conv(n_outputs: int = 3) -> nn.Module:
    from models.custom_models_base import TinyConv

    return TinyConv(n_outputs)


CONFIG = cfg.load(
    Path(__file__).resolve().parent.parent / "experiments" / "demo2_tinyconv_tinydata.toml"
)


def test_the_model_check_leaves_the_random_states_and_the_mode_as_they_were():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    samples = [{"data": torch.zeros(3, 32, 32), "label": torch.tensor([1.0, 0, 0])}]
    datasets = {"train": check(RandomSamples(samples, label_meanings=NAMES))}
    model = tiny_conv()
    before = rng_states()
    check_input(model, datasets, BatchPrep(datasets["train"], torch.device("cpu"), False), CONFIG)
    after = rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert model.training  # back in training mode
    model.eval()
    check_input(model, datasets, BatchPrep(datasets["train"], torch.device("cpu"), False), CONFIG)
    assert not model.training


def model_check_error(model: nn.Module, images: dict[str, torch.Tensor]) -> str:
    label = torch.tensor([1.0, 0.0, 0.0])
    datasets = {
        split: check(ListDataset([{"data": x, "label": label, "img_idx": 0}], label_meanings=NAMES))
        for split, x in images.items()
    }
    prep = BatchPrep(datasets["train"], torch.device("cpu"), False)
    with pytest.raises(ConfigError) as e:
        check_input(model, datasets, prep, CONFIG)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_model_that_does_not_take_the_images_size_is_one_line_naming_it():
    train_48 = {"train": torch.zeros(3, 48, 48)}
    text = model_check_error(tiny_conv(), train_48)
    assert text.startswith(
        "The model models.custom_models_base:TinyConv fails on the train split's images of "
        "3 x 48 x 48 ([C, H, W]): mat1 and mat2 shapes cannot be multiplied (1x400 and 144x3); "
        "resize the images"
    )
    assert text.endswith("or use a model for any size (models.any_size:TinyConvAnySize).")
    # Train at 32 x 32 but val at 40 x 40: val is named.
    text = model_check_error(tiny_conv(), {"train": IMG32, "val": torch.zeros(3, 40, 40)})
    assert "the val split's images of 3 x 40 x 40" in text


class ReturnsTensor(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :3]


class ConvHead(nn.Module):
    """Logits from a 1 x 1 conv, averaged over the image: no linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x).mean((2, 3))}


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (ReturnsTensor(), "returns a Tensor for a batch of one image"),
        (
            ConvHead(),
            "returns 'out' of shape [1, 5] for a batch of one image and the dataset has 3",
        ),
        (tiny_conv(4), "returns 'out' of shape [1, 4]"),
    ],
)
def test_a_model_whose_output_does_not_fit_the_labels_is_one_line(model, needle):
    text = model_check_error(model, {"train": IMG32})
    assert needle in text
    assert text.endswith(
        "forward must return {'out': logits [B, 3]} (set [model.args] n_outputs = 3)."
    )
