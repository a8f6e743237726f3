"""Is the set of seeds B really better than A? Two parent runs of `--seeds`.

    python -m src.tools.compare_runs --seed-sets PARENT_A PARENT_B

Each parent's finished child runs (src/sweep/multirun.py makes them) count one value each: the
difference of the means of `best_val_auroc_mean` with a bootstrap interval over seeds, the
probability that a seed of B beats a seed of A, and a note below 5 seeds a side; per class,
the same difference of means from each child's per-class table. Sets whose children were
validated on different data are refused. Logged as a comparison run like `--paired`'s
(src/tools/significance.py): tag `comparison = seeds`, artifacts `comparison/seeds.csv`,
`comparison/seeds_per_class.csv` and `comparison/forest.png`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import src.stats as stats
import src.tools.compare_stats as compare_stats
import src.tracking as tracking
from src.errors import TrackingError
from src.tools.significance import comparison_folder, forest_plot, log_comparison, read_table

MIN_SEEDS = 5  # below this many seeds a side, the bootstrap over seeds is rough
SEEDS_METRIC = "best_val_auroc_mean"


@dataclass
class SeedsComparison:
    table: pd.DataFrame  # one row per child run: set (A or B), run name and id, seed, value
    per_class: pd.DataFrame  # one row per class, then "mean": B - A of the means over seeds
    result: compare_stats.GroupComparison
    metric: str

    def lines(self, names: tuple[str, str]) -> list[str]:
        out = []
        for group, name in zip("AB", names):
            values = self.table.loc[self.table["set"] == group, self.metric]
            sd = f" +- {values.std():.3f} (sd)" if len(values) > 1 else ""
            out.append(
                f"{group}: {name}: {len(values)} seeds, {self.metric} {values.mean():.3f}{sd}"
            )
        out.append(self.verdict)
        if min(self.result.n_a, self.result.n_b) < MIN_SEEDS:
            out.append(
                f"note: {self.result.n_a} and {self.result.n_b} seeds: with fewer than "
                f"{MIN_SEEDS} a side, the bootstrap over seeds is rough (its interval is too "
                "narrow); run more seeds for a firm answer."
            )
        return out

    @property
    def verdict(self) -> str:
        d, beats = self.result.difference, self.result.prob_b_beats_a
        return (
            f"B - A: {self.metric} {d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] (bootstrap over "
            f"seeds); a seed of B beats a seed of A with probability {beats:.2f}"
        )

    def metrics(self) -> dict[str, float]:
        d = self.result.difference
        return {
            "mean_diff": d.value, "mean_diff_ci_low": d.low, "mean_diff_ci_high": d.high,
            "prob_b_beats_a": self.result.prob_b_beats_a,
            "seeds_a": self.result.n_a, "seeds_b": self.result.n_b,
        }  # fmt: skip


def seed_children(uri: str, parent_id: str, metric: str) -> list[Any]:
    """The finished child runs of the `--seeds` parent run `parent_id` that logged `metric`."""
    parent = tracking.get_run(uri, parent_id)
    if "seeds" not in parent.data.tags:
        raise TrackingError(
            f"MLflow run {parent_id} is not the parent run of a set of seeds (it has no seeds "
            "tag); pass the ids printed as 'Parent run of the N seeds: <id>'."
        )
    children = [
        r
        for r in tracking.child_runs(uri, parent_id)
        if r.info.status == "FINISHED" and metric in r.data.metrics
    ]
    if not children:
        raise TrackingError(
            f"The set of seeds {parent_id} ({parent.info.run_name}) has no finished child run "
            f"with {metric}; let it finish (run its --seeds command again) first."
        )
    return children


def compare_seed_sets(
    uri: str, parent_a: str, parent_b: str, metric: str = SEEDS_METRIC, split: str = "val"
) -> SeedsComparison:
    """B's seeds against A's (see the module docstring); refused when their children were
    validated on different data."""
    groups = {"A": seed_children(uri, parent_a, metric), "B": seed_children(uri, parent_b, metric)}
    key = f"data.{split}.fingerprint"
    prints = {r.data.tags.get(key) for runs in groups.values() for r in runs} - {None}
    if len(prints) > 1:
        raise TrackingError(
            f"The child runs of {parent_a} and {parent_b} were validated on different data "
            f"({key}: {', '.join(sorted(prints))}); compare seeds of one dataset."
        )
    rows = [
        {
            "set": group,
            "run_name": r.info.run_name,
            "run_id": r.info.run_id,
            "seed": r.data.params.get("run.seed", ""),
            metric: r.data.metrics[metric],
        }  # fmt: skip
        for group, runs in groups.items()
        for r in runs
    ]
    table = pd.DataFrame(rows)
    values = [table.loc[table["set"] == g, metric].to_numpy() for g in "AB"]
    result = compare_stats.compare_groups(*values)
    return SeedsComparison(table, _per_class_over_seeds(uri, groups, split), result, metric)


def _per_class_over_seeds(uri: str, groups: dict[str, list[Any]], split: str) -> pd.DataFrame:
    """B - A of each class's AUROC and AP, means over seeds, with bootstrap intervals over
    seeds, from each child's per-class table; the row "mean" is the summary metric's."""
    path, what = f"tables/{split}_per_class_metrics.csv", "it is written when a run finishes"
    tables = {g: [read_table(uri, r, path, what) for r in runs] for g, runs in groups.items()}
    labels = list(tables["A"][0]["label"])
    if any(list(t["label"]) != labels for group in tables.values() for t in group):
        raise TrackingError(
            f"The child runs of the two sets of seeds have different classes in their {path}; "
            "compare seeds of one dataset."
        )
    rows: dict[str, list] = {"label": [*labels, "mean"]}
    for name in ("auroc", "ap"):
        a = np.array([t[name].to_numpy(dtype=np.float64) for t in tables["A"]])  # [seeds, K]
        b = np.array([t[name].to_numpy(dtype=np.float64) for t in tables["B"]])
        found = [
            compare_stats.compare_groups(a[:, k], b[:, k]).difference
            if not (np.isnan(a[:, k]).any() or np.isnan(b[:, k]).any())
            else stats.Interval(math.nan, math.nan, math.nan)
            for k in range(len(labels))
        ]
        mean = compare_stats.compare_groups(np.nanmean(a, axis=1), np.nanmean(b, axis=1)).difference
        rows[f"{name}_diff"] = [*(f.value for f in found), mean.value]
        rows[f"{name}_diff_ci_low"] = [*(f.low for f in found), mean.low]
        rows[f"{name}_diff_ci_high"] = [*(f.high for f in found), mean.high]
    return pd.DataFrame(rows)


def show_seed_sets(
    uri: str, parent_a: str, parent_b: str, split: str = "val", out: Path | None = None
) -> int:
    """`--seed-sets`: print the comparison, write seeds.csv, seeds_per_class.csv and
    forest.png to `out` and log them as a comparison run; the verdict (and a note below
    MIN_SEEDS seeds) last."""
    found = compare_seed_sets(uri, parent_a, parent_b, split=split)
    parents = tracking.get_run(uri, parent_a), tracking.get_run(uri, parent_b)
    names = tuple(f"{r.info.run_name} ({r.info.run_id})" for r in parents)
    out = comparison_folder(out, "seeds", parent_a, parent_b)
    files = [out / "seeds.csv", out / "seeds_per_class.csv"]
    found.table.to_csv(files[0], index=False)
    found.per_class.to_csv(files[1], index=False)
    title = f"B = {names[1]}, A = {names[0]}; means over seeds"
    files.append(forest_plot(found.per_class, title, out / "forest.png"))
    with pd.option_context("display.width", None, "display.max_columns", None):
        print(found.table.to_string(index=False, float_format=lambda v: f"{v:.4f}") + "\n")
    tracker = log_comparison(uri, "seeds", parents, found.verdict, found.metrics(), files)
    print(f"Tables: {files[0]}, {files[1].name}\nPlot:   {files[2]}")
    print(f"Logged as MLflow run {tracker.run_id} in B's experiment")
    print("\n".join(found.lines(names)))
    return 0
