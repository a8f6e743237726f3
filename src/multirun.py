"""Several runs under one parent MLflow run: a set of seeds, or a grid of settings.

The parent run holds the summary (mean and standard deviation over seeds, or one row per grid
cell) so the MLflow UI shows the group as one expandable line.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from src import tracking
from src.config import ExperimentConfig
from src.distributed import is_main_process
from src.experiment import RunResult, run

SUMMARY_KEYS = ("val_auroc_mean", "val_ap_mean")


def run_children(
    config: ExperimentConfig,
    children: list[tuple[str, dict[str, Any]]],
    parent_name: str,
    parent_tags: dict[str, Any] | None = None,
) -> tuple[str, list[RunResult]]:
    """Run `config` once per (child name, dotted overrides) as child runs of a new parent.

    Returns the parent run id and the children's results. The parent ends FAILED (and the
    error propagates) if a child fails, KILLED on Ctrl-C.
    """
    # Under torchrun every rank runs every child together; only rank 0 tracks and reports.
    main = is_main_process()
    parent = tracking.start_parent(config, parent_name, parent_tags or {}, enabled=main)
    results: list[RunResult] = []
    try:
        for name, overrides in children:
            child = config.replace(**{"run.run_name": name, **overrides})
            results.append(run(child, parent_run_id=parent.run_id))
        if main:
            _log_summary(parent, children, results)
        parent.end("FINISHED")
    except KeyboardInterrupt:
        parent.end("KILLED")
        raise
    except BaseException:
        parent.end("FAILED")
        raise
    return parent.run_id, results


def _best(result: RunResult, key: str) -> float:
    return result.best_metrics.get(f"best_{key}", math.nan)


def _log_summary(parent, children, results: list[RunResult]) -> None:
    import pandas as pd

    rows = []
    for (name, overrides), result in zip(children, results):
        row = {"run_name": name, "run_id": result.run_id, "best_epoch": result.best_epoch}
        row.update({k: v for k, v in overrides.items()})
        row.update({f"best_{k}": _best(result, k) for k in SUMMARY_KEYS})
        rows.append(row)
    table = pd.DataFrame(rows)
    summary: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        values = [_best(r, key) for r in results if not math.isnan(_best(r, key))]
        if values:
            summary[f"best_{key}.mean"] = statistics.fmean(values)
            summary[f"best_{key}.std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    parent.log_epoch(summary, 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "children.csv"
        table.to_csv(path, index=False)
        parent.log_artifact(path, "summary")
    print("\n" + table.to_string(index=False))
    for key, value in summary.items():
        print(f"{key}: {value:.4f}")


def run_seeds(config: ExperimentConfig, seeds: list[int]) -> tuple[str, list[RunResult]]:
    """The experiment once per seed; the parent gets mean and std of the best-epoch metrics."""
    children = [(f"{config.run.run_name}-seed{s}", {"run.seed": s}) for s in seeds]
    return run_children(
        config, children, f"{config.run.run_name}-seeds", {"seeds": " ".join(map(str, seeds))}
    )
