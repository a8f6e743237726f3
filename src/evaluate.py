"""Metrics (per-class AUROC, average precision, accuracy) and the plots made from them.

All functions take plain NumPy arrays: `labels` [N, K] of 0/1 and `probs` [N, K] of
probabilities (sigmoid outputs for multi-label problems, softmax outputs for multi-class).

AUROC and average precision are scikit-learn's (`roc_auc_score`, `average_precision_score`),
one call for all the classes of an epoch. Measured per epoch's metrics on one core: PASCAL val
(1,449 images x 20 labels) 24 ms against 4 ms for the NumPy sums this repository used to
keep, under 1% of an epoch; TinyData val (50 x 3) 3.4 ms against 0.2 ms, 4 ms of Demo-2's
18 ms epochs. Tables are written by pandas.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn.metrics as skm
from matplotlib.ticker import MaxNLocator


def metric_name(label: str) -> str:
    """A label made safe for an MLflow metric key (letters, digits, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", label)


def _defined(labels_k: np.ndarray) -> bool:
    # AUROC and AP need both a positive and a negative example of the class.
    return 0 < labels_k.sum() < len(labels_k)


def compute_metrics(
    labels: np.ndarray, probs: np.ndarray, label_meanings: list[str], problem: str = "multilabel"
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
    aurocs, aps = np.full((2, labels.shape[1]), math.nan)
    defined = [k for k in range(labels.shape[1]) if _defined(labels[:, k])]
    if defined:  # (for one class scikit-learn returns a number: numpy assigns it the same)
        y, p = labels[:, defined], probs[:, defined]
        aurocs[defined] = skm.roc_auc_score(y, p, average=None)
        aps[defined] = skm.average_precision_score(y, p, average=None)
    right = (probs >= 0.5) == (labels >= 0.5)
    accs = right.mean(axis=0) if len(labels) else np.full(labels.shape[1], math.nan)
    out: dict[str, float] = {}
    for k, name in enumerate(map(metric_name, label_meanings)):
        out[f"auroc/{name}"], out[f"ap/{name}"] = float(aurocs[k]), float(aps[k])
        out[f"accuracy/{name}"] = float(accs[k])
    out["auroc_mean"] = float(np.mean(aurocs[defined])) if defined else math.nan
    out["ap_mean"] = float(np.mean(aps[defined])) if defined else math.nan
    out["accuracy_mean"] = float(np.mean(accs))
    if problem == "multiclass" and len(labels):
        out["accuracy"] = float(np.mean(labels.argmax(1) == probs.argmax(1)))
    return out


def best_f1_threshold(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) for one label: predicting `prob >= threshold` maximizes F1 on these
    images (ties: the higher threshold); the threshold lies half way between the lowest
    probability called positive and the next lower one. 0.5 (F1 NaN) without positives."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    n_pos = float(np.sum(labels))
    if n_pos == 0:
        return 0.5, math.nan
    values = np.unique(probs)[::-1]  # each distinct probability, highest first
    # The images at or above each value, and the positives among them.
    called, tps = (
        len(s) - np.searchsorted(np.sort(s), values) for s in (probs, probs[labels == 1])
    )
    f1 = 2 * tps / (called + n_pos)
    i = int(np.argmax(f1))  # the first maximum: the highest threshold
    below = values[i + 1] if i + 1 < len(values) else values[i]
    return float((values[i] + below) / 2), float(f1[i])


def choose_thresholds(labels: np.ndarray, probs: np.ndarray) -> list[tuple[float, float]]:
    """(threshold, F1) per label column, see `best_f1_threshold`."""
    return [best_f1_threshold(labels[:, k], probs[:, k]) for k in range(probs.shape[1])]


Columns = dict[str, list]  # a table: column name -> its values, in row order


def thresholds_table(meanings: list[str], chosen: list[tuple[float, float]]) -> Columns:
    """One row per label: label, threshold, val_f1."""
    thresholds, f1s = zip(*chosen)
    return {"label": list(meanings), "threshold": list(thresholds), "val_f1": list(f1s)}


def per_class_table(
    metrics: dict[str, float], labels: np.ndarray, label_meanings: list[str]
) -> Columns:
    """One row per class: label, positives, auroc, ap, accuracy."""
    names = [metric_name(meaning) for meaning in label_meanings]
    positives = np.asarray(labels).sum(axis=0).astype(int).tolist()
    table = {"label": list(label_meanings), "positives": positives}
    return table | {
        key: [metrics[f"{key}/{name}"] for name in names] for key in ("auroc", "ap", "accuracy")
    }


def write_csv(path: Path, table: Columns) -> Path:
    """The table as a CSV file (pandas' `to_csv`, no index; a missing value, NaN, is an
    empty cell); folders made as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(table).to_csv(path, index=False)
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
    labels: np.ndarray, probs: np.ndarray, label_meanings: list[str], out_dir: Path, title: str
) -> list[Path]:
    """ROC and precision-recall curves, one line per class (scikit-learn's displays, the area
    in the legend), saved as roc.png and pr.png."""
    plt = pyplot()
    paths = []
    for kind, display in (("roc", skm.RocCurveDisplay), ("pr", skm.PrecisionRecallDisplay)):
        fig, ax = plt.subplots(figsize=(7, 6))
        drawn = [k for k in range(len(label_meanings)) if _defined(labels[:, k])]
        for k in drawn:
            display.from_predictions(labels[:, k], probs[:, k], ax=ax, name=label_meanings[k])
        if kind == "roc":
            ax.plot([0, 1], [0, 1], "k--", lw=0.5)
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
        else:
            ax.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall")
        if drawn:  # a split where no class has both a positive and a negative: no curves
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
        margins = {"left": 0.1, "right": 0.97, "bottom": 0.09, "top": 0.94}
        paths.append(save_figure(fig, Path(out_dir) / f"{kind}.png", margins))
    return paths


def plot_learning_curves(history: list[dict[str, float]], out_path: Path) -> Path:
    """Loss and mean AUROC/AP per epoch from the loop's history (one dict per epoch)."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys in ((ax1, ("train_loss", "val_loss")), (ax2, ("val_auroc_mean", "val_ap_mean"))):
        for key in keys:
            ax.plot(epochs, [h.get(key, math.nan) for h in history], marker=".", label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
        ax.legend()
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", title="validation", ylim=(0, 1.02))
    margins = {"left": 0.06, "right": 0.98, "bottom": 0.13, "top": 0.92, "wspace": 0.15}
    return save_figure(fig, out_path, margins)
