"""src.evaluate: metrics with hand-computed expectations, and the plots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from src import evaluate


def test_perfect_and_inverted_ranking():
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])
    probs = np.array([[0.9, 0.8], [0.1, 0.2], [0.8, 0.1], [0.2, 0.9]])
    m = evaluate.compute_metrics(labels, probs, ["a", "b"])
    assert m["auroc/a"] == 1.0  # positives 0.9, 0.8 above negatives 0.1, 0.2
    # b: positives 0.2, 0.1 ; negatives 0.8, 0.9 -> every pair inverted
    assert m["auroc/b"] == 0.0
    assert m["auroc_mean"] == 0.5
    assert m["accuracy/a"] == 1.0
    assert m["accuracy/b"] == 0.0  # 0.8->1 vs 0, 0.2->0 vs 1, 0.1->0 vs 1, 0.9->1 vs 0


def test_average_precision_by_hand():
    # ranking by prob: 0.9 (pos), 0.7 (neg), 0.5 (pos) -> precisions at positives 1, 2/3
    labels = np.array([[1], [0], [1]])
    probs = np.array([[0.9], [0.7], [0.5]])
    m = evaluate.compute_metrics(labels, probs, ["x"])
    assert m["ap/x"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["auroc/x"] == pytest.approx(0.5)  # pairs: (0.9>0.7) yes, (0.5>0.7) no


def test_single_valued_class_is_nan_and_excluded_from_means():
    labels = np.array([[1, 1], [0, 1], [1, 1]])
    probs = np.array([[0.9, 0.3], [0.2, 0.6], [0.7, 0.5]])
    m = evaluate.compute_metrics(labels, probs, ["ok", "all_positive"])
    assert math.isnan(m["auroc/all_positive"]) and math.isnan(m["ap/all_positive"])
    assert m["auroc_mean"] == 1.0 and m["ap_mean"] == 1.0


def test_multiclass_top1_accuracy():
    labels = np.eye(3)[[0, 1, 2, 1]]
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])
    m = evaluate.compute_metrics(labels, probs, ["a", "b", "c"], problem="multiclass")
    assert m["accuracy"] == 0.75


def test_metric_name_is_mlflow_safe():
    assert evaluate.metric_name("dining_table") == "dining_table"
    assert evaluate.metric_name("a:b(c)") == "a_b_c_"


def test_plots_written(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((20, 3)) > 0.5).astype(float)
    probs = rng.random((20, 3))
    paths = evaluate.plot_roc_pr(labels, probs, ["r", "g", "b"], tmp_path, "val")
    assert [p.name for p in paths] == ["roc.png", "pr.png"]
    history = [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.0,
            "val_auroc_mean": 0.5,
            "val_ap_mean": 0.5,
        }
        for e in range(3)
    ]
    curve = evaluate.plot_learning_curves(history, tmp_path / "curves.png")
    for p in [*paths, curve]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
