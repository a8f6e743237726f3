"""Metrics (per-class AUROC, average precision, accuracy) and the plots made from them.

All functions take plain NumPy arrays: `labels` [N, K] of 0/1 and `probs` [N, K] of
probabilities (sigmoid outputs for multi-label problems, softmax outputs for multi-class).

AUROC and average precision are computed here in NumPy, the way scikit-learn's
`roc_auc_score` and `average_precision_score` define them (tied scores are one threshold;
AP = sum over thresholds of precision x recall step): they run every epoch, where
scikit-learn's per-call checks cost more than the sums themselves, and the training process
then never imports scikit-learn. tests/test_evaluate.py holds them equal to scikit-learn's.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np


def metric_name(label: str) -> str:
    """A label made safe for an MLflow metric key (letters, digits, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", label)


def _defined(labels_k: np.ndarray) -> bool:
    # AUROC and AP need both a positive and a negative example of the class.
    return 0 < labels_k.sum() < len(labels_k)


def binary_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positives, true positives, threshold) at each distinct score of `p`, highest
    score first: predicting positive at score >= threshold gives those counts."""
    order = np.argsort(p, kind="mergesort")[::-1]
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the last index of each score
    tps = np.cumsum(y)[last]
    return 1 + last - tps, tps, p[last]


def roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) from (0, 0) to (1, 1)."""
    fps, tps, _ = binary_curve(y, p)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def pr_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) from the highest threshold down."""
    fps, tps, _ = binary_curve(y, p)
    return tps / tps[-1], tps / (tps + fps)


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (trapezoids: a tie between classes counts half)."""
    fpr, tpr = roc_curve(y, p)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Sum over thresholds of (recall step) x precision, without interpolation."""
    recall, precision = pr_curve(y, p)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    label_meanings: list[str],
    problem: str = "multilabel",
) -> dict[str, float]:
    """Per-class and mean metrics.

    Returns keys `auroc/<label>`, `ap/<label>`, `accuracy/<label>` (at threshold 0.5),
    `auroc_mean`, `ap_mean`, `accuracy_mean`, and for multi-class problems `accuracy`
    (top-1). A class whose labels are all one value gets NaN AUROC and AP; the means are
    over the classes where they are defined (NaN when none is).
    """
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.shape != probs.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} must both be [N, K]")
    out: dict[str, float] = {}
    aurocs, aps, accs = [], [], []
    for k, meaning in enumerate(label_meanings):
        y, p = labels[:, k], probs[:, k]
        name = metric_name(meaning)
        if _defined(y):
            area, ap = auroc(y, p), average_precision(y, p)
            aurocs.append(area)
            aps.append(ap)
        else:
            area = ap = math.nan
        acc = float(np.mean((p >= 0.5) == (y >= 0.5))) if len(y) else math.nan
        accs.append(acc)
        out[f"auroc/{name}"] = area
        out[f"ap/{name}"] = ap
        out[f"accuracy/{name}"] = acc
    out["auroc_mean"] = float(np.mean(aurocs)) if aurocs else math.nan
    out["ap_mean"] = float(np.mean(aps)) if aps else math.nan
    out["accuracy_mean"] = float(np.nanmean(accs)) if accs else math.nan
    if problem == "multiclass" and len(labels):
        out["accuracy"] = float(np.mean(labels.argmax(1) == probs.argmax(1)))
    return out


def best_f1_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) for one label: predicting `prob >= threshold` maximizes F1 on these
    images (ties: the higher threshold); the threshold lies half way between the lowest
    probability called positive and the next lower one. 0.5 (F1 NaN) without positives."""
    n_pos = float(np.sum(labels))
    if n_pos == 0:
        return 0.5, math.nan
    fps, tps, values = binary_curve(np.asarray(labels, dtype=np.float64), np.asarray(probs))
    f1 = 2 * tps / (fps + tps + n_pos)
    i = int(np.argmax(f1))  # the first maximum: the highest threshold
    below = values[i + 1] if i + 1 < len(values) else values[i]
    return float((values[i] + below) / 2), float(f1[i])


def choose_thresholds(labels: np.ndarray, probs: np.ndarray) -> list[tuple[float, float]]:
    """(threshold, F1) per label column, see `best_f1_threshold`."""
    return [best_f1_threshold(labels[:, k], probs[:, k]) for k in range(probs.shape[1])]


Columns = dict[str, list]  # a table: column name -> its values, in row order


def thresholds_table(meanings: list[str], chosen: list[tuple[float, float]]) -> Columns:
    """One row per label: label, threshold, val_f1."""
    return {
        "label": list(meanings),
        "threshold": [t for t, _ in chosen],
        "val_f1": [f for _, f in chosen],
    }


def per_class_table(
    metrics: dict[str, float], labels: np.ndarray, label_meanings: list[str]
) -> Columns:
    """One row per class: label, positives, auroc, ap, accuracy."""
    names = [metric_name(meaning) for meaning in label_meanings]
    return {
        "label": list(label_meanings),
        "positives": [int(np.asarray(labels)[:, k].sum()) for k in range(len(names))],
        "auroc": [metrics[f"auroc/{name}"] for name in names],
        "ap": [metrics[f"ap/{name}"] for name in names],
        "accuracy": [metrics[f"accuracy/{name}"] for name in names],
    }


def write_csv(path: Path, table: Columns) -> Path:
    """The table as a CSV file, as pandas' `to_csv(index=False)` writes it (a missing value,
    NaN, as an empty cell), without importing pandas: most of a second at every run's end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(table.values())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(table)
        for row in zip(*columns):
            writer.writerow(
                ["" if isinstance(v, (float, np.floating)) and np.isnan(v) else v for v in row]
            )
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots go to files and never need a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_path: str | Path, margins: dict[str, float] | None = None) -> Path:
    """Write `fig` as a PNG at `out_path` (folders made as needed) and close it. `margins`
    (subplots_adjust's, as fractions of the figure) place the axes of a figure whose labels
    are known to fit; else matplotlib's tight layout measures them (nearly half of the time
    a small figure takes: the plots of every run use fixed margins)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if margins is None:
        fig.tight_layout()
    else:
        fig.subplots_adjust(**margins)
    fig.savefig(out_path, dpi=100)
    pyplot().close(fig)
    return out_path


def plot_roc_pr(
    labels: np.ndarray,
    probs: np.ndarray,
    label_meanings: list[str],
    out_dir: Path,
    title: str,
) -> list[Path]:
    """ROC and precision-recall curves, one line per class, saved as roc.png and pr.png."""
    plt = pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(7, 6))
        for k, meaning in enumerate(label_meanings):
            y, p = labels[:, k], probs[:, k]
            if not _defined(y):
                continue
            if kind == "roc":
                x_, y_ = roc_curve(y, p)
                score = auroc(y, p)
            else:
                recall, precision = pr_curve(y, p)
                x_, y_ = np.r_[0.0, recall], np.r_[1.0, precision]
                score = average_precision(y, p)
            ax.plot(x_, y_, lw=1, label=f"{meaning} ({score:.3f})")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            ax.set(xlabel="false positive rate", ylabel="true positive rate")
        else:
            ax.set(xlabel="recall", ylabel="precision")
        ax.set(title=f"{title}: {'ROC' if kind == 'roc' else 'precision-recall'}")
        ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
        margins = {"left": 0.1, "right": 0.97, "bottom": 0.09, "top": 0.94}
        paths.append(save_figure(fig, out_dir / f"{kind}.png", margins))
    return paths


def plot_learning_curves(history: list[dict[str, float]], out_path: Path) -> Path:
    """Loss and mean AUROC/AP per epoch from the loop's history (one dict per epoch)."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("train_loss", "val_loss"):
        ax1.plot(epochs, [h.get(key, math.nan) for h in history], marker=".", label=key)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax1.legend()
    for key in ("val_auroc_mean", "val_ap_mean"):
        ax2.plot(epochs, [h.get(key, math.nan) for h in history], marker=".", label=key)
    ax2.set(xlabel="epoch", title="validation", ylim=(0, 1.02))
    ax2.legend()
    margins = {"left": 0.06, "right": 0.98, "bottom": 0.13, "top": 0.92, "wspace": 0.15}
    return save_figure(fig, out_path, margins)
