"""src.evaluate: metrics with hand-computed expectations, and the plots."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src import evaluate

# matplotlib's default colour cycle, which the plots use for one line per class or run.
TAB10 = {"C0": (31, 119, 180), "C1": (255, 127, 14), "C2": (44, 160, 44), "C3": (214, 39, 40)}


def png_pixels(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG at `path` as [H, W, 3] uint8 RGB, after checking it is a PNG of `size` (W, H)
    and not blank (axes, text and curves make hundreds of distinct colours; blank is one)."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    codes = (pixels.astype(np.int32) * [1 << 16, 1 << 8, 1]).sum(axis=-1)
    assert len(np.unique(codes)) > 50
    return pixels


def count_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 40) -> int:
    """Pixels within `tolerance` of `rgb` in every channel (anti-aliased lines blend a bit)."""
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


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


@pytest.mark.parametrize("decimals", [None, 1])  # continuous scores, and many ties
def test_auroc_and_ap_equal_scikit_learns(decimals):
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(0)
    for n in (2, 3, 17, 500):
        labels = (rng.random((n, 4)) < [0.5, 0.1, 0.9, 0.3]).astype(float)
        labels[0], labels[1] = 1, 0  # every class defined
        probs = np.clip(labels * 0.3 + rng.random((n, 4)) * 0.7, 0, 1)
        if decimals is not None:
            probs = probs.round(decimals)
        m = evaluate.compute_metrics(labels, probs, list("abcd"))
        for k, name in enumerate("abcd"):
            y, p = labels[:, k], probs[:, k]
            assert m[f"auroc/{name}"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
            assert m[f"ap/{name}"] == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_average_precision_by_hand():
    # ranking by prob: 0.9 (pos), 0.7 (neg), 0.5 (pos) -> precisions at positives 1, 2/3
    labels = np.array([[1], [0], [1]])
    probs = np.array([[0.9], [0.7], [0.5]])
    m = evaluate.compute_metrics(labels, probs, ["x"])
    assert m["ap/x"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["auroc/x"] == pytest.approx(0.5)  # pairs: (0.9>0.7) yes, (0.5>0.7) no


def test_auroc_and_ap_rank_the_scores_rather_than_cut_them_at_one_half():
    labels = np.array([[1, 1], [0, 0], [1, 1], [0, 0], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.9], [0.8, 0.6], [0.7, 0.45], [0.6, 0.4], [0.2, 0.3], [0.1, 0.2]])
    # Only the first four rows count for class a: give rows 4-5 to class b alone.
    m_a = evaluate.compute_metrics(labels[:4, :1], probs[:4, :1], ["a"])
    # a: positives 0.9, 0.7; negatives 0.8, 0.6, every score above 0.5.
    # pairs (pos, neg): (0.9, 0.8) yes, (0.9, 0.6) yes, (0.7, 0.8) no, (0.7, 0.6) yes -> 3/4.
    # Cut at 0.5 all four would be 1: every pair tied, AUROC 0.5.
    assert m_a["auroc/a"] == pytest.approx(0.75)
    # ranked: 0.9 pos (precision 1/1), 0.8 neg, 0.7 pos (2/3), 0.6 neg. Cut at 0.5: 2/4.
    assert m_a["ap/a"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m_a["accuracy/a"] == 0.5  # all predicted positive, two of four are

    m = evaluate.compute_metrics(labels[:, 1:], probs[:, 1:], ["b"])
    # b straddles 0.5: positives 0.9, 0.45, 0.3; negatives 0.6, 0.4, 0.2.
    # 0.9 beats all 3 negatives, 0.45 beats 0.4 and 0.2, 0.3 beats 0.2 -> 6 of 9 pairs.
    # Cut at 0.5: positives 1, 0, 0 and negatives 1, 0, 0 -> (2 + 2.5 ties) / 9 = 0.5.
    assert m["auroc/b"] == pytest.approx(6 / 9)
    # ranked: 0.9 P (1/1), 0.6 N, 0.45 P (2/3), 0.4 N, 0.3 P (3/5), 0.2 N.
    assert m["ap/b"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    # predicted 1, 1, 0, 0, 0, 0 against 1, 0, 1, 0, 1, 0: rows 0, 3, 5 right.
    assert m["accuracy/b"] == 0.5

    both = evaluate.compute_metrics(labels[:4], probs[:4], ["a", "b"])
    # b on rows 0-3: positives 0.9, 0.45; negatives 0.6, 0.4 -> 3/4; AP (1 + 2/3) / 2.
    assert both["auroc_mean"] == pytest.approx((0.75 + 0.75) / 2)
    assert both["ap_mean"] == pytest.approx((1 + 2 / 3) / 2)


def brute_force_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie), over every pair."""
    pairs = [(sp, sn) for sp in p[y == 1] for sn in p[y == 0]]
    return sum(1.0 if sp > sn else 0.5 if sp == sn else 0.0 for sp, sn in pairs) / len(pairs)


def brute_force_ap(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over the positives of the precision among the examples ranked at or above it
    (scores must be distinct, so that every example has one rank)."""
    ranked = y[np.argsort(-p)]
    precisions = [ranked[: r + 1].mean() for r in range(len(ranked)) if ranked[r] == 1]
    return float(np.mean(precisions))


def test_auroc_and_ap_match_brute_force_definitions_on_random_data():
    rng = np.random.default_rng(7)
    n, k = 60, 4
    labels = (rng.random((n, k)) < [0.2, 0.5, 0.7, 0.4]).astype(float)
    labels[:2] = [[0, 0, 0, 0], [1, 1, 1, 1]]  # every class has both values
    # Scores on a grid of 11 values: many ties, between and across the two labels.
    tied = np.clip(np.round(0.3 * labels + 0.7 * rng.random((n, k)), 1), 0, 1)
    m = evaluate.compute_metrics(labels, tied, list("abcd"))
    expected = [brute_force_auroc(labels[:, j], tied[:, j]) for j in range(k)]
    assert len(np.unique(tied[:, 0])) < n / 4  # the ties are really there
    assert [m[f"auroc/{c}"] for c in "abcd"] == pytest.approx(expected, abs=1e-12)
    assert m["auroc_mean"] == pytest.approx(np.mean(expected), abs=1e-12)

    distinct = 0.3 * labels + 0.7 * rng.random((n, k))
    assert all(len(np.unique(distinct[:, j])) == n for j in range(k))
    m = evaluate.compute_metrics(labels, distinct, list("abcd"))
    expected_ap = [brute_force_ap(labels[:, j], distinct[:, j]) for j in range(k)]
    assert [m[f"ap/{c}"] for c in "abcd"] == pytest.approx(expected_ap, abs=1e-12)
    assert m["ap_mean"] == pytest.approx(np.mean(expected_ap), abs=1e-12)
    expected_auroc = [brute_force_auroc(labels[:, j], distinct[:, j]) for j in range(k)]
    assert [m[f"auroc/{c}"] for c in "abcd"] == pytest.approx(expected_auroc, abs=1e-12)


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


def test_multiclass_accuracy_is_the_argmax_not_a_cut_at_one_half():
    labels = np.eye(3)[[0, 1, 2, 2, 1]]
    probs = np.array(
        [
            [0.40, 0.35, 0.25],  # argmax 0, right, though no probability reaches 0.5
            [0.30, 0.45, 0.25],  # 1, right
            [0.50, 0.10, 0.40],  # 0, wrong (2)
            [0.20, 0.30, 0.50],  # 2, right
            [0.45, 0.35, 0.20],  # 0, wrong (1)
        ]
    )
    m = evaluate.compute_metrics(labels, probs, ["a", "b", "c"], problem="multiclass")
    assert m["accuracy"] == pytest.approx(3 / 5)
    # Cut at 0.5 instead, 10 of the 15 entries would be right (2 + 2 + 1 + 3 + 2 per row).
    # per class, cut at 0.5: a predicts 0, 0, 1, 0, 0 against 1, 0, 0, 0, 0 -> 3 of 5 right.
    assert m["accuracy/a"] == pytest.approx(3 / 5)
    assert m["accuracy/c"] == pytest.approx(4 / 5)  # 0, 0, 0, 1, 0 against 0, 0, 1, 1, 0
    # the multi-label default has no top-1 key: argmax means nothing there.
    assert "accuracy" not in evaluate.compute_metrics(labels, probs, ["a", "b", "c"])


def test_metric_name_is_mlflow_safe():
    assert evaluate.metric_name("dining_table") == "dining_table"
    assert evaluate.metric_name("a:b(c)") == "a_b_c_"


def test_plots_draw_one_coloured_line_per_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((20, 3)) > 0.5).astype(float)
    probs = rng.random((20, 3))
    paths = evaluate.plot_roc_pr(labels, probs, ["r", "g", "b"], tmp_path, "val")
    assert [p.name for p in paths] == ["roc.png", "pr.png"]
    for path in paths:
        pixels = png_pixels(path, (700, 600))  # figsize (7, 6) at 100 dpi
        for colour in ("C0", "C1", "C2"):  # three classes, three lines
            assert count_colour(pixels, TAB10[colour]) > 100, (path.name, colour)
        assert count_colour(pixels, TAB10["C3"]) == 0, path.name  # and no fourth

    history = [
        {
            "epoch": e,
            "train_loss": 1 / (e + 1),
            "val_loss": 1.2 - 0.1 * e,
            "val_auroc_mean": 0.6 + 0.1 * e,
            "val_ap_mean": 0.3 + 0.1 * e,
        }
        for e in range(3)
    ]  # curves apart, so that neither hides the other
    curve = evaluate.plot_learning_curves(history, tmp_path / "curves.png")
    pixels = png_pixels(curve, (1100, 400))  # figsize (11, 4) at 100 dpi
    left, right = pixels[:, :550], pixels[:, 550:]
    for panel in (left, right):  # train/val loss on the left, AUROC/AP on the right
        assert count_colour(panel, TAB10["C0"]) > 100 and count_colour(panel, TAB10["C1"]) > 100


def test_write_csv_writes_what_pandas_to_csv_writes(tmp_path):
    """The run's tables: float32 probabilities at their shortest, Python floats in full, ints,
    a name with a comma quoted, and NaN as an empty cell; what pandas' to_csv writes."""
    import pandas as pd

    table = {
        "name": ["a.png", "b, c.png"],
        "prob_x": list(np.array([0.123456789, 1e-8], dtype=np.float32)),
        "auroc": [0.1 + 0.2, float("nan")],
        "label_x": [1, 0],
    }
    path = evaluate.write_csv(tmp_path / "tables" / "t.csv", table)
    assert path.read_text() == pd.DataFrame(table).to_csv(index=False)
    assert path.read_text().splitlines() == [
        "name,prob_x,auroc,label_x",
        "a.png,0.12345679,0.30000000000000004,1",
        '"b, c.png",1e-08,,0',
    ]
