"""Is B really better than A? Two runs scored on the same images.

    python -m src.tools.compare_runs --paired RUN_A RUN_B

The best-epoch predictions each run logged (`tables/val_predictions.csv`) are read back; runs
whose validation data differ (the tag `data.val.fingerprint`, or the images, labels or classes
of the two tables) are refused. Per class and for the mean over classes: B - A of AUROC with
DeLong's paired test, of AP with a paired bootstrap over images (the same resampled images for
both runs); per-class p-values corrected for testing every class (Holm). One line says it all:
"B - A: mean AUROC +0.012 [+0.004, +0.020], p = 0.003; better on 3 of 20 classes, worse on 0
(Holm-corrected p < 0.05)". Two sets of seeds are src/tools/seed_sets.py's.

A comparison is logged as an MLflow run of its own in B's experiment, so that the runs
compared stay as they were and B can be compared with several runs: tags `comparison`
(`paired`, or `seeds`), `comparison.a`, `comparison.b` (run ids) and the verdict as the run's
description; metrics (`auroc_mean_diff`, `..._ci_low`, `..._ci_high`, `auroc_mean_p`, ...);
artifacts: the table (`comparison/paired.csv`) and `comparison/forest.png` (B - A per class
with 95% intervals). The same files go to the folder `--out`.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import src.stats as stats
import src.tools.compare_stats as compare_stats
import src.tracking as tracking
from src.config import REPO_ROOT
from src.errors import TrackingError
from src.evaluate import pyplot, save_figure

ALPHA = 0.05  # a class is better or worse when its Holm-corrected p is below this
# The forest plot's colours: B better, B worse (Holm-corrected), neither; the mean.
BETTER, WORSE, NEITHER, MEAN = "tab:green", "tab:red", "tab:gray", "black"


# ------------------------------------------------------------------ reading runs


@dataclass
class Predictions:
    """A run's best-epoch predictions on one split: image names [N], class names [K],
    labels and probabilities [N, K]."""

    names: list[str]
    meanings: list[str]
    labels: np.ndarray
    probs: np.ndarray


def read_table(uri: str, run: Any, path: str, what_to_do: str) -> pd.DataFrame:
    """The run's CSV artifact `path` as a DataFrame (every cell as written: names stay text)."""
    store = tracking.Store(uri)
    folder, _, name = path.rpartition("/")
    run_id = run.info.run_id
    if name not in {Path(a.path).name for a in store.list_artifacts(run_id, folder or None)}:
        raise TrackingError(
            f"MLflow run {run_id} ({run.info.run_name}) has no artifact {path}; {what_to_do}."
        )
    with tracking.quiet(), tempfile.TemporaryDirectory() as tmp:
        local = store.download_artifacts(run_id, path, tmp)
        return pd.read_csv(local, dtype={"name": str, "label": str}, keep_default_na=False)


def read_predictions(uri: str, run: Any, split: str) -> Predictions:
    """The predictions CSV a training run logs at its end (src/train/outputs.py)."""
    path = f"tables/{split}_predictions.csv"
    table = read_table(
        uri, run, path, "it is written when a training run finishes: pass finished runs"
    )
    meanings = [c[len("prob_") :] for c in table.columns if c.startswith("prob_")]
    missing = [f"label_{m}" for m in meanings if f"label_{m}" not in table.columns]
    if "name" not in table.columns or not meanings or missing:
        raise TrackingError(
            f"The artifact {path} of MLflow run {run.info.run_id} is not a predictions table "
            "(columns name, prob_<class>, label_<class>); pass runs trained by this project."
        )
    labels = table[[f"label_{m}" for m in meanings]].to_numpy(dtype=np.float64)
    probs = table[[f"prob_{m}" for m in meanings]].to_numpy(dtype=np.float64)
    return Predictions(list(table["name"]), meanings, labels, probs)


def check_same_images(runs: tuple[Any, Any], preds: tuple[Predictions, Predictions], split: str):
    """Refuse (one line) two runs whose `split` data differ: by their data fingerprint tags,
    else by the images, classes and labels of their predictions."""
    (a, b), (pa, pb) = runs, preds
    key = f"data.{split}.fingerprint"
    fa, fb = a.data.tags.get(key), b.data.tags.get(key)
    ids = f"A ({a.info.run_id}) and B ({b.info.run_id})"
    if fa and fb and fa != fb:
        raise TrackingError(
            f"Runs {ids} were validated on different data ({key} {fa} and {fb}); a paired "
            f"test needs the same {split} images and labels in both: compare runs of one "
            "dataset, or use --experiment for a table."
        )
    if (
        pa.names != pb.names
        or pa.meanings != pb.meanings
        or not np.array_equal(pa.labels, pb.labels)
    ):
        raise TrackingError(
            f"Runs {ids} predicted different {split} images, classes or labels (their "
            f"tables/{split}_predictions.csv differ); a paired test needs the same data in both."
        )


# ------------------------------------------------------------------ two runs, the same images


@dataclass
class PairedComparison:
    table: pd.DataFrame  # one row per class, then the row "mean"
    auroc_mean: stats.Interval  # B - A of the mean AUROC
    ap_mean: stats.Interval
    better: int  # classes whose AUROC is higher in B, Holm-corrected p < ALPHA
    worse: int
    tested: int  # classes with an AUROC
    images: int

    @property
    def verdict(self) -> str:
        m = self.auroc_mean
        return (
            f"B - A: mean AUROC {m.value:+.3f} [{m.low:+.3f}, {m.high:+.3f}], {p_text(m.p)}; "
            f"better on {self.better} of {self.tested} classes, worse on {self.worse} "
            f"(Holm-corrected p < {ALPHA})"
        )

    @property
    def ap_line(self) -> str:
        m = self.ap_mean
        return f"B - A: mean AP {m.value:+.3f} [{m.low:+.3f}, {m.high:+.3f}], {p_text(m.p)}"

    def metrics(self) -> dict[str, float]:
        out = {"classes_better": self.better, "classes_worse": self.worse}
        for name, m in (("auroc", self.auroc_mean), ("ap", self.ap_mean)):
            out |= {f"{name}_mean_diff": m.value, f"{name}_mean_p": m.p}
            out |= {f"{name}_mean_diff_ci_low": m.low, f"{name}_mean_diff_ci_high": m.high}
        return out


def p_text(p: float) -> str:
    return "p = nan" if math.isnan(p) else f"p = {p:.3f}" if p >= 0.001 else f"p = {p:.1e}"


def compare_predictions(
    labels: np.ndarray,
    probs_a: np.ndarray,
    probs_b: np.ndarray,
    meanings: list[str],
    n_resamples: int = compare_stats.COMPARE_RESAMPLES,
    seed: int = stats.SEED,
) -> PairedComparison:
    """B - A per class and for the mean: AUROC by DeLong's paired test, AP by a paired
    bootstrap; per-class p-values Holm-corrected (each metric on its own)."""
    auroc, auroc_mean = compare_stats.paired_delong(labels, probs_a, probs_b)
    ap, ap_mean = compare_stats.paired_bootstrap(
        labels, probs_a, probs_b, n_resamples=n_resamples, seed=seed
    )
    rows: dict[str, list] = {"label": [*meanings, "mean"]}
    rows["positives"] = [*labels.sum(axis=0).astype(int).tolist(), None]
    for name, (per_class, mean) in (("auroc", (auroc, auroc_mean)), ("ap", (ap, ap_mean))):
        rows[f"{name}_a"], rows[f"{name}_b"] = (
            _values(name, labels, p) for p in (probs_a, probs_b)
        )
        rows[f"{name}_diff"] = [*per_class.value, mean.value]
        rows[f"{name}_diff_ci_low"] = [*per_class.low, mean.low]
        rows[f"{name}_diff_ci_high"] = [*per_class.high, mean.high]
        rows[f"{name}_p"] = [*per_class.p, mean.p]
        # The mean is one test: its p needs no correction.
        rows[f"{name}_p_holm"] = [*compare_stats.holm(per_class.p), mean.p]
    table = pd.DataFrame(rows)
    classes = table.iloc[:-1]
    significant = classes["auroc_p_holm"] < ALPHA
    return PairedComparison(
        table, auroc_mean, ap_mean,
        int((significant & (classes["auroc_diff"] > 0)).sum()),
        int((significant & (classes["auroc_diff"] < 0)).sum()),
        int(classes["auroc_p"].notna().sum()), len(labels),
    )  # fmt: skip


def _values(name: str, labels: np.ndarray, probs: np.ndarray) -> list[float]:
    """One run's AUROC ('auroc') or AP ('ap') of each class, then their mean over the classes
    that have a positive and a negative image."""
    defined = stats.defined_classes(labels)
    if name == "auroc":
        per_class = stats.delong(labels, probs).auroc
    else:
        per_class = stats.weighted_average_precision(labels, probs, np.ones((1, len(labels))))[0]
    per_class = np.where(defined, per_class, np.nan)
    mean = float(per_class[defined].mean()) if defined.any() else math.nan
    return [*(float(v) for v in per_class), mean]


def paired_text(table: pd.DataFrame) -> str:
    """The table as printed: per class and the mean, each run's AUROC, B - A with its
    interval and Holm-corrected p, and the same for AP (3 decimals)."""
    shown = pd.DataFrame({"label": table["label"]})
    shown["pos"] = [("" if pd.isna(v) else str(int(v))) for v in table["positives"]]
    for name, title in (("auroc", "AUROC"), ("ap", "AP")):
        shown[f"{title} A"] = [_num(v) for v in table[f"{name}_a"]]
        shown[f"{title} B"] = [_num(v) for v in table[f"{name}_b"]]
        shown[f"B-A {title} [95%]"] = [
            f"{_num(d, '+')} [{_num(lo, '+')}, {_num(hi, '+')}]"
            for d, lo, hi in table[[f"{name}_diff", f"{name}_diff_ci_low", f"{name}_diff_ci_high"]]
            .itertuples(index=False)
        ]  # fmt: skip
        shown[f"p {title}"] = [_p(v) for v in table[f"{name}_p_holm"]]
    with pd.option_context("display.width", None, "display.max_columns", None):
        return shown.to_string(index=False)


def _num(value: float, sign: str = "") -> str:
    return "-" if pd.isna(value) else f"{value:{sign}.3f}"


def _p(value: float) -> str:
    return "-" if pd.isna(value) else p_text(value)[4:]


def compare_pair(
    uri: str,
    run_a: str,
    run_b: str,
    split: str = "val",
    n_resamples: int = compare_stats.COMPARE_RESAMPLES,
) -> tuple[PairedComparison, tuple[Any, Any]]:
    """The paired comparison of the runs `run_a` and `run_b` on their `split` predictions."""
    runs = tracking.get_run(uri, run_a), tracking.get_run(uri, run_b)
    preds = tuple(read_predictions(uri, run, split) for run in runs)
    check_same_images(runs, preds, split)
    pa, pb = preds
    return compare_predictions(pa.labels, pa.probs, pb.probs, pa.meanings, n_resamples), runs


# ------------------------------------------------------------------ the plot and MLflow


def forest_plot(table: pd.DataFrame, title: str, out_path: Path) -> Path:
    """B - A per class (and the mean, last) with 95% intervals: AUROC on the left, AP on the
    right; a class whose Holm-corrected p (where the table has one) is below ALPHA is green
    (B better) or red (B worse)."""
    plt = pyplot()
    rows = len(table)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.4 + 0.3 * rows), sharey=True)
    y = np.arange(rows)[::-1]  # the first class on top, the mean at the bottom
    for ax, (name, shown) in zip(axes, (("auroc", "AUROC"), ("ap", "AP"))):
        diff = table[f"{name}_diff"].to_numpy(dtype=np.float64)
        low = table[f"{name}_diff_ci_low"].to_numpy(dtype=np.float64)
        high = table[f"{name}_diff_ci_high"].to_numpy(dtype=np.float64)
        p = table.get(f"{name}_p_holm", pd.Series([math.nan] * rows)).to_numpy(dtype=np.float64)
        for i in range(rows):
            if math.isnan(diff[i]):
                continue
            colour = MEAN if i == rows - 1 else NEITHER
            if i < rows - 1 and p[i] < ALPHA:
                colour = BETTER if diff[i] > 0 else WORSE
            ax.errorbar(
                diff[i], y[i], xerr=[[diff[i] - low[i]], [high[i] - diff[i]]], color=colour,
                fmt="D" if i == rows - 1 else "o", capsize=3,
            )  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.axhline(0.5, color="gray", lw=0.5, ls=":")  # the mean below the classes
        ax.set(xlabel=f"B - A, {shown}", title=f"{shown}: B - A with 95% intervals")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, list(table["label"]))
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, out_path)


def log_comparison(
    uri: str, kind: str, runs: tuple[Any, Any], verdict: str, metrics: dict[str, float],
    files: list[Path],
) -> tracking.Tracker:  # fmt: skip
    """The comparison as a FINISHED MLflow run of its own in B's experiment (see the module
    docstring); the tracker of that run."""
    a, b = runs
    experiment = tracking.Store(uri).get_experiment(b.info.experiment_id).name
    tags = {
        "comparison": kind, "comparison.a": a.info.run_id, "comparison.b": b.info.run_id,
        "mlflow.note.content": verdict,
    }  # fmt: skip
    name = f"compare {a.info.run_name} vs {b.info.run_name}"
    tracker = tracking.start(uri, experiment, name, tags)
    with tracking.ended_on_error(tracker):
        tracker.log_epoch(metrics, 0)
        for path in files:
            tracker.log_artifact(path, "comparison")
    tracker.end("FINISHED")
    return tracker


# ------------------------------------------------------------------ the commands


def comparison_folder(out: Path | None, kind: str, a: str, b: str) -> Path:
    out = out or REPO_ROOT / "results" / "compare" / f"{kind}-{a[:8]}-{b[:8]}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def show_paired(
    uri: str, run_a: str, run_b: str, split: str = "val",
    n_resamples: int = compare_stats.COMPARE_RESAMPLES, out: Path | None = None,
) -> int:  # fmt: skip
    """`--paired`: print the comparison, write paired.csv and forest.png to `out` and log
    them as a comparison run; the verdict is the last line."""
    found, runs = compare_pair(uri, run_a, run_b, split, n_resamples)
    names = [f"{r.info.run_name} ({r.info.run_id})" for r in runs]
    out = comparison_folder(out, "paired", run_a, run_b)
    csv_path = out / "paired.csv"
    found.table.to_csv(csv_path, index=False)
    title = f"B = {names[1]}, A = {names[0]}; {split} predictions"
    plot = forest_plot(found.table, title, out / "forest.png")
    print(f"A: {names[0]}\nB: {names[1]}")
    print(f"{split}: the same {found.images} images in both runs\n")
    print(paired_text(found.table))
    print(
        "(p: Holm-corrected across classes, the mean's as it is; AUROC by DeLong's paired "
        f"test, AP by a paired bootstrap of {n_resamples} resamples)\n"
    )
    tracker = log_comparison(uri, "paired", runs, found.verdict, found.metrics(), [csv_path, plot])
    print(f"Table: {csv_path}\nPlot:  {plot}")
    print(f"Logged as MLflow run {tracker.run_id} in B's experiment")
    print(found.ap_line)
    print(found.verdict)
    return 0
