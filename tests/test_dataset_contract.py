"""The dataset contract: checked on the first sample before training, with one-line errors,
and torchvision's conventions accepted as they are."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from load_dataset.errors import DataError
from src.train.build import train_drop_last
from src.train.dataset_contract import StandardSamples, checked_dataset
from tests.contract_data import ListDataset

IMG = torch.zeros(3, 4, 4)
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
