"""Several runs under one parent MLflow run: a set of seeds, or a grid of settings.

The parent run holds the summary (mean and standard deviation over seeds, or one row per grid
cell) so the MLflow UI shows the group as one expandable line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import sys
from typing import Any

import pandas as pd

import src.interrupts as interrupts
import src.tracking as tracking
from src.config import ExperimentConfig
from src.distributed import is_main_process
from src.train.experiment import RunResult, results_dir, run

SUMMARY_KEYS = ("val_auroc_mean", "val_ap_mean")


def run_children(
    config: ExperimentConfig,
    children: list[tuple[str, dict[str, Any]]],
    parent_name: str,
    parent_tags: dict[str, Any] | None = None,
) -> tuple[str, list[RunResult]]:
    """Run `config` once per (child name, dotted overrides) as child runs of one parent.

    Returns the parent run id and the children's results. The parent ends FAILED (and the
    error propagates) if a child fails, KILLED on Ctrl-C or SIGTERM. Running the same group
    again (same config, same children) after it stopped goes on where it stopped: the parent
    is reopened, finished children are skipped, a stopped child resumes from its last.pt.
    """
    # Under torchrun every rank runs every child together; only rank 0 tracks and reports.
    main = is_main_process()
    # What makes two commands the same group: the config and the children's overrides.
    text = json.dumps([config.flat(), children], sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    uri = tracking.tracking_uri(config.run.tracking_uri)
    parent_id, before = tracking.find_group(uri, config.run.experiment_name, key)
    tags = {**(parent_tags or {}), "group.key": key}
    parent = start_parent(config, parent_name, tags, parent_id) if main else tracking.NullTracker()
    if parent_id is not None and main:
        done = sum(1 for r in before.values() if r.info.status == "FINISHED")
        print(f"Going on with {parent_name} ({parent_id}): {done} of {len(children)} finished.")
    results: list[RunResult] = []
    try:
        with tracking.ended_on_error(parent):
            for name, overrides in children:
                child = config.replace(**{"run.run_name": name, **overrides})
                results.append(_run_child(child, before.get(name), parent.run_id))
            if main:
                log_summary(parent, children, results)
            parent.end("FINISHED")
    except BaseException as e:
        if interrupts.stop_of(e) is not None and main:
            print(
                f"\n{parent_name} stopped; finished runs are kept. Run the same command again "
                f"to go on (finished runs are skipped, the stopped one resumes): {same_command()}",
                file=sys.stderr,
                flush=True,
            )
        raise
    return parent.run_id, results


def start_parent(
    config: ExperimentConfig,
    run_name: str,
    tags: dict[str, Any],
    reopen: str | None = None,
) -> tracking.Tracker:
    """A run in the config's experiment without the config's params: the parent that groups
    child runs (a grid, a sweep or a set of seeds). `reopen`: the id of a parent that did not
    finish, marked RUNNING again."""
    uri = tracking.tracking_uri(config.run.tracking_uri)
    if reopen is not None:
        return tracking.reopen(uri, reopen)
    return tracking.start(uri, config.run.experiment_name, run_name, tags)


def _run_child(child: ExperimentConfig, before: Any, parent_id: str) -> RunResult:
    """Run one child; one that finished before is skipped, one that stopped resumes."""
    if before is None:
        return run(child, parent_run_id=parent_id)
    if before.info.status == "FINISHED":
        print(f"{child.run.run_name}: finished before (run {before.info.run_id}), skipped.")
        return finished_result(before)
    folder = results_dir(child, before.info.run_id)
    if not (folder / "last.pt").is_file():  # stopped before its first epoch ended
        return run(child, parent_run_id=parent_id)
    print(f"{child.run.run_name}: resuming run {before.info.run_id} from {folder}.")
    return run(child, resume=folder, parent_run_id=parent_id)


def finished_result(run: Any) -> RunResult:
    """The RunResult of a finished MLflow run, from its logged best-epoch metrics."""
    best = {k: v for k, v in run.data.metrics.items() if k.startswith("best_")}
    return RunResult(
        run.info.run_id, run.info.experiment_id, None, int(best.get("best_epoch", 0)), best
    )


def same_command() -> str:
    """This process's command line, as the user can type it again."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name != "__main__" else sys.argv[:1]
    launcher = "torchrun <same options>" if "TORCHELASTIC_RUN_ID" in os.environ else "python"
    return f"{launcher} {shlex.join([*head, *sys.argv[1:]])}"


def log_summary(parent, children, results: list[RunResult]) -> None:
    """The parent's summary: mean and std of the children's best-epoch metrics, and the
    table `summary/children.csv` (one row per child), also printed."""
    rows = []
    for (name, overrides), result in zip(children, results):
        row = {"run_name": name, "run_id": result.run_id, "best_epoch": result.best_epoch}
        best = {f"best_{k}": result.best_metrics.get(f"best_{k}", math.nan) for k in SUMMARY_KEYS}
        rows.append({**row, **overrides, **best})
    table = pd.DataFrame(rows)
    summary: dict[str, float] = {}
    for key in SUMMARY_KEYS:
        values = table[f"best_{key}"].dropna()
        if len(values):
            summary[f"best_{key}.mean"] = float(values.mean())
            summary[f"best_{key}.std"] = float(values.std()) if len(values) > 1 else 0.0
    parent.log_epoch(summary, 0)
    parent.log_text(table.to_csv(index=False), "summary/children.csv")
    print("\n" + table.to_string(index=False))
    for key, value in summary.items():
        print(f"{key}: {value:.4f}")


def run_seeds(config: ExperimentConfig, seeds: list[int]) -> tuple[str, list[RunResult]]:
    """The experiment once per seed; the parent gets mean and std of the best-epoch metrics."""
    children = [(f"{config.run.run_name}-seed{s}", {"run.seed": s}) for s in seeds]
    return run_children(
        config, children, f"{config.run.run_name}-seeds", {"seeds": " ".join(map(str, seeds))}
    )
