"""What a finished run leaves: the best weights evaluated again, ROC/PR plots, a predictions
CSV, a per-class metrics CSV (each AUROC and AP with its 95% interval, src/stats.py, and the
intervals of their means as run metrics) and the learning curves, written under the results
folder and logged to MLflow; then the per-label thresholds chosen on the validation split, the
gallery of explanations (`plots/explanations.png`), the error gallery (`plots/errors/`) and
the best weights as the MLflow model `model` of the run (src/serve/model_package.py),
registered when `run.register_model` names it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import src.distributed as ddp
import src.evaluate as evaluate
import src.serve.explain as explain
import src.serve.model_package as mp
import src.stats as stats
import src.train.checkpoint as ckpt_io
from src.errors import ConfigError
from src.train.build import build_loader
from src.train.loop import epoch_metrics, predict

if TYPE_CHECKING:
    from src.train.build import Trainer


Files = list[tuple[Path, str]]  # (a file, the run's artifact folder it goes to)
# metric -> (per class, mean over classes): the estimates with their 95% intervals.
Intervals = dict[str, tuple[stats.Interval, stats.Interval]]


def log_best_outputs(t: Trainer) -> dict[str, float]:
    """Evaluate the best weights once more on val (and test) and log plots, predictions,
    tables, the learning curves and the best weights (the MLflow model, or best.pt); returns
    the `best_*` summary."""
    best_path = t.results_dir / "best.pt"
    if not best_path.is_file():
        return {}
    best = ckpt_io.load_checkpoint(best_path, "best.pt")
    best_epoch = int(best["epoch"])
    t.state.model.load_state_dict(best["model"])
    summary: dict[str, float] = {"best_epoch": float(best_epoch)}
    files: Files = [] if t.config.run.log_model else [(best_path, "checkpoint")]
    preds = {}
    for split, ds in t.datasets.items():
        if split == "train":
            continue
        loader = build_loader(ds, t.config, ddp.DistInfo(), t.batches.device, train=False)
        pred = preds[split] = predict(t.state.model, loader, t.batches)
        metrics = epoch_metrics(pred, list(ds.label_meanings), t.config.data.problem, split)
        summary.update({f"best_{k}": v for k, v in metrics.items() if "/" not in k})
        intervals = metric_intervals(pred)
        summary.update(mean_interval_metrics(intervals, f"best_{split}_"))
        files += write_split_outputs(t.results_dir, split, ds, pred, metrics, intervals)
    # Per label, the threshold that maximizes F1 on the validation split, in
    # `tables/thresholds.csv` with that F1; none for a multiclass run (it predicts the most
    # probable class).
    thresholds, val = None, preds["val"]
    if t.config.data.problem != "multiclass" and len(val["idx"]):
        chosen = evaluate.choose_thresholds(val["labels"], val["probs"])
        table = evaluate.thresholds_table(list(t.datasets["val"].label_meanings), chosen)
        csv = evaluate.write_csv(t.results_dir / "tables" / "thresholds.csv", table)
        files.append((csv, "tables"))
        thresholds = [threshold for threshold, _ in chosen]
    if t.config.explain.gallery:
        files += draw_explanations(t, val, thresholds)
    curves = t.results_dir / "plots" / "learning_curves.png"
    files.append((evaluate.plot_learning_curves(t.state.history, curves), "plots"))
    # A run resumed to train longer whose best epoch did not change has logged this already.
    if best_epoch not in t.tracker.logged_steps("best_epoch"):
        t.tracker.log_epoch(summary, best_epoch)
    for path, folder in files:
        t.tracker.log_artifact(path, folder)
    if t.config.run.log_model:
        log_model_package(t, best_path, thresholds, best_epoch)
    return summary


def draw_explanations(t: Trainer, pred: dict[str, Any], thresholds: list[float] | None) -> Files:
    """`plots/explanations.png`: the first validation images (with a true label), their true
    labels, probabilities and the heatmap of each true class; `plots/errors/<label>.png`: per
    class, the validation images most confidently called wrong (by `thresholds`, the most
    probable class in a multiclass run) under that class's heatmap (src/serve/explain.py)."""
    ds, cfg = t.datasets["val"], t.config.explain
    try:
        explain.find_target_layer(t.state.model, cfg.target_layer)
    except ConfigError as e:
        print(f"note: no plots/explanations.png nor plots/errors/: {e}", file=sys.stderr)
        return []
    labels, probs, meanings = pred["labels"], pred["probs"], list(ds.label_meanings)
    rows = explain.gallery_rows(labels, probs, cfg.gallery_images)
    classes = [explain.classes_to_show(labels[r], probs[r]) for r in rows]
    images, maps = images_and_maps(t, pred, rows, classes)
    gallery = t.results_dir / "plots" / "explanations.png"
    explain.save_gallery(images, labels[rows], probs[rows], maps, meanings, gallery)
    positive = mp.called_positive(probs, t.config.data.problem, thresholds)
    errors = explain.error_rows(labels, probs, positive)
    wrong, classes = explain.error_pairs(errors)
    images, maps = images_and_maps(t, pred, wrong, classes)
    ids = getattr(ds, "image_ids", None)
    names = [ids[i] if ids is not None else f"val #{i}" for i in pred["idx"][wrong].astype(int)]
    folder = t.results_dir / "plots" / "errors"
    tiles = list(zip(images, maps, names))
    drawn = explain.save_errors(errors, tiles, labels, probs, meanings, folder)
    return [(gallery, "plots")] + [(p, "plots/errors") for p in drawn]


def images_and_maps(
    t: Trainer, pred: dict[str, Any], rows: list[int], classes: list[list[int]]
) -> tuple[list[Any], list[list[Any]]]:
    """The pictures (uint8 [H, W, 3]) of validation `rows` (rows of `pred`) and their
    heatmaps of `classes` (a list per row)."""
    ds, cfg = t.datasets["val"], t.config.explain
    if not rows:
        return [], []
    samples = [ds[int(pred["idx"][r])] for r in rows]
    data = torch.stack([s["data"] for s in samples])
    x, _ = t.batches.prep({"data": data, "label": torch.stack([s["label"] for s in samples])})
    maps = explain.heatmaps(t.state.model, x, classes, cfg.cam, cfg.target_layer)
    transform = mp.input_transform_of(ds)
    return [explain.display_image(s["data"].cpu(), transform) for s in samples], maps


def log_model_package(
    t: Trainer, best_path: Path, thresholds: list[float] | None, best_epoch: int
) -> None:
    """The best weights as the MLflow model `model` of the run (src/serve/model_package.py;
    registered when `run.register_model` names it; it holds best.pt); a note instead when the
    dataset has no input transform, and best.pt logged as the run's artifact
    `checkpoint/best.pt`."""
    ds, config = t.datasets["val"], t.config
    transform = mp.input_transform_of(ds)
    if transform is None:
        print(
            f"note: no MLflow model logged: the dataset {config.data.dataset} has neither "
            "input_transform nor transform (what turns an image into its sample); best.pt is "
            f"in {t.results_dir}.",
            file=sys.stderr,
            flush=True,
        )
        t.tracker.log_artifact(best_path, "checkpoint")  # the weights, kept with the run
        return
    spec = mp.ClassifierSpec(
        config.model.model, dict(config.model.args), list(ds.label_meanings),
        config.data.problem, transform, getattr(ds, "mean_std", None), thresholds,
        config.explain.target_layer,
    )  # fmt: skip
    code_from = (config.model.model, config.data.dataset)
    with tempfile.TemporaryDirectory() as tmp:
        model = mp.pyfunc_model(mp.ImageClassifier(spec), best_path, code_from, Path(tmp))
        name, register_as = mp.MODEL_NAME, config.run.register_model
        alias = config.run.model_alias
        registered = t.tracker.log_model(name, best_epoch, register_as, alias, **model)
    also = f", registered as models:/{register_as}/{registered}" if registered else ""
    also += f" and models:/{register_as}@{alias}" if registered and alias else ""
    print(f"MLflow model: runs:/{t.tracker.run_id}/{name}{also}", flush=True)


def metric_intervals(pred: dict[str, Any]) -> Intervals:
    """The 95% intervals of each class's AUROC (DeLong's, on the logit scale) and AP (a
    bootstrap over images, `stats.RUN_RESAMPLES` resamples), and of their means over the
    classes; none for a split without images."""
    labels, probs = pred["labels"], pred["probs"]
    if not len(labels):
        return {}
    return {
        "auroc": stats.auroc_intervals(labels, probs),
        "ap": stats.bootstrap_intervals(labels, probs, n_resamples=stats.RUN_RESAMPLES),
    }


def mean_interval_metrics(intervals: Intervals, prefix: str) -> dict[str, float]:
    """`<prefix>auroc_mean_ci_low`, `..._ci_high` and the same for AP."""
    out = {}
    for name, (_, mean) in intervals.items():
        out[f"{prefix}{name}_mean_ci_low"] = float(mean.low)
        out[f"{prefix}{name}_mean_ci_high"] = float(mean.high)
    return out


def write_split_outputs(
    results_dir: Path, split: str, ds, pred, metrics, intervals: Intervals | None = None
) -> Files:
    """ROC/PR plots, a predictions CSV and a per-class metrics CSV for one split; the table
    gives each AUROC and AP with its 95% interval (`metric_intervals`, computed here unless
    given)."""
    meanings, labels, probs = list(ds.label_meanings), pred["labels"], pred["probs"]
    plots = evaluate.plot_roc_pr(
        labels, probs, meanings, results_dir / "plots" / split, f"{split} (best epoch)"
    )
    ids = getattr(ds, "image_ids", None)
    names = [ids[i] if ids is not None else str(i) for i in pred["idx"].astype(int)]
    table = {"name": names}
    table.update({f"prob_{m}": list(probs[:, k]) for k, m in enumerate(meanings)})
    table.update({f"label_{m}": labels[:, k].astype(int).tolist() for k, m in enumerate(meanings)})
    prefix = f"{split}_"
    ours = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    per_class = evaluate.per_class_table(ours, labels, meanings)
    per_class = with_intervals(
        per_class, metric_intervals(pred) if intervals is None else intervals
    )
    tables = results_dir / "tables"
    pred_csv = evaluate.write_csv(tables / f"{split}_predictions.csv", table)
    class_csv = evaluate.write_csv(tables / f"{split}_per_class_metrics.csv", per_class)
    return [(p, f"plots/{split}") for p in plots] + [(pred_csv, "tables"), (class_csv, "tables")]


def with_intervals(table: evaluate.Columns, intervals: Intervals) -> evaluate.Columns:
    """The per-class table with `<metric>_ci_low` and `<metric>_ci_high` after each metric
    that has intervals (empty cells where a class has none)."""
    out: evaluate.Columns = {}
    for column, values in table.items():
        out[column] = values
        if column in intervals:
            per_class, _ = intervals[column]
            out[f"{column}_ci_low"] = [float(x) for x in per_class.low]
            out[f"{column}_ci_high"] = [float(x) for x in per_class.high]
    return out
