"""What a finished run leaves: the best weights evaluated again, ROC/PR plots, a predictions
CSV, a per-class metrics CSV and the learning curves, written under the results folder and
logged to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from src import checkpoint as ckpt_io
from src import distributed as ddp
from src import evaluate
from src.build import build_loader
from src.loop import epoch_metrics, predict

if TYPE_CHECKING:
    from src.build import Trainer


def log_best_outputs(t: Trainer) -> dict[str, float]:
    """Evaluate the best weights once more on val (and test) and log plots, predictions,
    tables, the learning curves and best.pt; returns the `best_*` summary."""
    best_path = t.results_dir / "best.pt"
    if not best_path.is_file():
        return {}
    best = ckpt_io.load_checkpoint(best_path, "best.pt")
    t.state.model.load_state_dict(best["model"])
    summary: dict[str, float] = {"best_epoch": float(best["epoch"])}
    single = ddp.DistInfo()
    for split, ds in t.datasets.items():
        if split == "train":
            continue
        loader = build_loader(ds, t.config, single, t.batches.device, train=False)
        pred = predict(t.state.model, loader, t.batches)
        metrics = epoch_metrics(pred, list(ds.label_meanings), t.config.data.problem, split)
        summary.update({f"best_{k}": v for k, v in metrics.items() if "/" not in k})
        write_split_outputs(t.tracker, t.results_dir, split, ds, pred, metrics)
    # A run resumed to train longer whose best epoch did not change has logged this already.
    if int(best["epoch"]) not in t.tracker.logged_steps("best_epoch"):
        t.tracker.log_epoch(summary, int(best["epoch"]))
    curves = evaluate.plot_learning_curves(
        t.state.history, t.results_dir / "plots" / "learning_curves.png"
    )
    t.tracker.log_artifact(curves, "plots")
    t.tracker.log_artifact(best_path, "model")
    return summary


def write_split_outputs(tracker, results_dir: Path, split: str, ds, pred, metrics) -> None:
    """ROC/PR plots, a predictions CSV and a per-class metrics CSV for one split."""
    import pandas as pd

    meanings = list(ds.label_meanings)
    plots = evaluate.plot_roc_pr(
        pred["labels"],
        pred["probs"],
        meanings,
        results_dir / "plots" / split,
        f"{split} (best epoch)",
    )
    for p in plots:
        tracker.log_artifact(p, f"plots/{split}")
    ids = getattr(ds, "image_ids", None)
    names = [ids[i] if ids is not None else str(i) for i in pred["idx"].astype(int)]
    table = pd.DataFrame({"name": names})
    for k, m in enumerate(meanings):
        table[f"prob_{m}"] = pred["probs"][:, k]
    for k, m in enumerate(meanings):
        table[f"label_{m}"] = pred["labels"][:, k].astype(int)
    (results_dir / "tables").mkdir(parents=True, exist_ok=True)
    pred_csv = results_dir / "tables" / f"{split}_predictions.csv"
    table.to_csv(pred_csv, index=False)
    prefix = f"{split}_"
    per_class = evaluate.per_class_table(
        {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)},
        pred["labels"],
        meanings,
    )
    class_csv = results_dir / "tables" / f"{split}_per_class_metrics.csv"
    per_class.to_csv(class_csv, index=False)
    tracker.log_artifact(pred_csv, "tables")
    tracker.log_artifact(class_csv, "tables")
