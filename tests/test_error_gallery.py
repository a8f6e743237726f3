"""The error gallery of a finished run (`plots/errors/<label>.png`, src/serve/explain.py): per
class, the validation images called positive without the label (highest probability first)
and those with the label not called positive (lowest first), on hand-made probabilities and
in a real tiny run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

import src.serve.explain as explain
from src.serve.model_package import called_positive
from tests.trained_runs import LABELS, train_tiny

# 6 images, 3 classes. Class 0 at 0.5: rows 0, 4 (0.9, a tie) and 1 (0.7) are called without
# the label, row 2 (0.2) has it and is not called; row 3 is right. Class 1 is always right.
# Class 2 at 0.15: rows 3, 4 (0.2, a tie) are called without the label; rows 1 (0.05), 0 and 2
# (0.1, a tie) have it and are not called.
LABELS_6 = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 1]])
PROBS_6 = np.array(
    [
        [0.9, 0.1, 0.1],
        [0.7, 0.8, 0.05],
        [0.2, 0.3, 0.1],
        [0.6, 0.2, 0.2],
        [0.9, 0.4, 0.2],
        [0.1, 0.9, 0.9],
    ],
    dtype=np.float32,
)
THRESHOLDS_6 = [0.5, 0.5, 0.15]


def test_error_rows_most_confident_first_ties_by_row():
    positive = called_positive(PROBS_6, "multilabel", THRESHOLDS_6)
    errors = explain.error_rows(LABELS_6, PROBS_6, positive)
    assert errors == {0: ([0, 4, 1], [2]), 2: ([3, 4], [1, 0, 2])}
    # At 0.5 for every class, class 2 calls only row 5 (which has the label).
    at_half = explain.error_rows(LABELS_6, PROBS_6, called_positive(PROBS_6, "multilabel", None))
    assert at_half == {0: ([0, 4, 1], [2]), 2: ([], [1, 0, 2])}


def test_error_rows_caps_per_kind_and_in_all():
    positive = called_positive(PROBS_6, "multilabel", THRESHOLDS_6)
    assert explain.error_rows(LABELS_6, PROBS_6, positive, shown=2) == {
        0: ([0, 4], [2]),
        2: ([3, 4], [1, 0]),
    }
    # The budget goes to the classes in order, false positives first.
    assert explain.error_rows(LABELS_6, PROBS_6, positive, budget=3) == {0: ([0, 4, 1], [])}
    assert explain.error_rows(LABELS_6, PROBS_6, positive, budget=5) == {
        0: ([0, 4, 1], [2]),
        2: ([3], []),
    }
    assert explain.error_rows(LABELS_6, PROBS_6, positive, budget=0) == {}


def test_error_rows_of_a_multiclass_run_follow_the_most_probable_class():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    labels = np.eye(3)[[0, 1, 1]]  # predicted: 0, 0, 2
    positive = called_positive(probs, "multiclass", None)
    assert explain.error_rows(labels, probs, positive) == {
        1: ([], [2, 1]),
        0: ([1], []),
        2: ([2], []),
    }
    assert explain.error_pairs(explain.error_rows(labels, probs, positive)) == (
        [1, 2],
        [[0, 1], [1, 2]],
    )


def test_error_file_names_are_safe_and_distinct():
    names = explain.error_file_names(["cat", "dining table", "a/b", "a_b", "", "x:y", "../up"])
    assert names == [
        "cat.png",
        "dining table.png",
        "a_b.png",
        "a_b~3.png",
        "~4.png",
        "x_y.png",
        ".._up.png",
    ]


def test_save_errors_draws_a_row_per_kind(tmp_path):
    positive = called_positive(PROBS_6, "multilabel", THRESHOLDS_6)
    errors = explain.error_rows(LABELS_6, PROBS_6, positive)
    rows, classes = explain.error_pairs(errors)
    assert (rows, classes) == ([0, 1, 2, 3, 4], [[0, 2], [0, 2], [0, 2], [2], [0, 2]])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8) for _ in rows]
    maps = [[rng.random((32, 32), dtype=np.float32) for _ in ks] for ks in classes]
    names = [f"img_{i}.jpg" for i in rows]
    meanings = ["cat", "dog", "a/b"]
    drawn = list(zip(images, maps, names))
    paths = explain.save_errors(errors, drawn, LABELS_6, PROBS_6, meanings, tmp_path)
    assert paths == [tmp_path / "cat.png", tmp_path / "a_b.png"]  # dog: no error, no file
    tile, text = explain.TILE, 14 * 3 + 4
    # cat: 3 false positives and 1 false negative; a/b: 2 and 3; each an image over its map.
    for path in paths:
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            assert picture.size == (3 * tile, 4 * (tile + text))


def test_shortened_keeps_what_a_tile_holds():
    assert explain.shortened("short") == "short"
    assert (
        explain.shortened("x" * 40 + "tail.jpg", end=True) == "..." + ("x" * 40 + "tail.jpg")[-27:]
    )
    assert explain.shortened("true: " + "a, " * 20) == ("true: " + "a, " * 20)[:27] + "..."


@pytest.fixture(scope="module")
def tiny(_store_template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-errors")
    return train_tiny(folder, _store_template, **{"run.log_model": False})


def expected_errors(tables: Path) -> dict[str, tuple[int, int]]:
    """label -> (false positives, false negatives) of the run's own tables: the predictions
    CSV against the thresholds CSV; labels without an error left out."""
    with open(tables / "thresholds.csv") as f:
        thresholds = {row["label"]: np.float32(row["threshold"]) for row in csv.DictReader(f)}
    with open(tables / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    out = {}
    for label in LABELS:
        called = [np.float32(r[f"prob_{label}"]) >= thresholds[label] for r in rows]
        truth = [r[f"label_{label}"] == "1" for r in rows]
        fp = sum(bool(c and not t) for c, t in zip(called, truth))
        fn = sum(bool(t and not c) for c, t in zip(called, truth))
        if fp or fn:
            out[label] = (fp, fn)
    return out


def test_a_run_logs_a_picture_per_class_with_errors(tiny):
    expected = expected_errors(tiny.results_dir / "tables")
    assert expected  # the tiny run is not perfect at its thresholds
    client = MlflowClient(tiny.uri)
    logged = [a.path for a in client.list_artifacts(tiny.run_id, "plots/errors")]
    assert logged == sorted(f"plots/errors/{label}.png" for label in expected)
    tile, text = explain.TILE, 14 * 3 + 4
    for label, (fp, fn) in expected.items():
        local = client.download_artifacts(tiny.run_id, f"plots/errors/{label}.png")
        with Image.open(local) as picture:
            assert picture.format == "PNG"
            width = max(min(fp, 4), min(fn, 4))
            height = 2 * ((fp > 0) + (fn > 0)) * (tile + text)  # each image over its map
            assert picture.size == (width * tile, height)
            picture.verify()
