"""Compare runs without leaving the terminal: an experiment's runs as a table, CSV and plot.

    python -m src.tools.compare_runs --experiment Demo-2-TinyConv-TinyData
    python -m src.tools.compare_runs --experiment Demo-2-TinyConv-TinyData \\
        --filter "params.optimizer.lr = '0.01'" --out results/lr-sweep

One row per run: its name and id, status, the params whose values differ between the runs
shown (the rest are equal, so they say nothing), and the best epoch with its metrics
(`best_val_auroc_mean`, `best_val_ap_mean`, `best_val_loss`, ...); like every epoch in MLflow,
`best_epoch` is the step, counted from 1. The table is printed and
written as `runs.csv`, and `val_auroc_mean.png` shows each run's curve over the epochs, in
`results/compare/<experiment>/` unless --out says otherwise. `--filter` takes MLflow's search
syntax (`params.<key>`, `metrics.<key>`, `tags.<key>`, `attributes.status`). Parent runs (of a
sweep, a set of seeds or a grid) hold no params and are left out, and the command says which;
their children are shown. Printed tables give numbers to 4 significant digits; the CSV keeps
every digit.

`--sweep PARENT_RUN_ID` shows one sweep (`python -m src.sweep`) instead: its trials sorted by the
objective, best first, with the values each trial drew and how it ended (`complete`, `pruned`).

Is B really better than A? `--paired RUN_A RUN_B` tests two runs on the same validation images
(DeLong's paired test of AUROC, a paired bootstrap of AP, per class and for the mean),
`--seed-sets PARENT_A PARENT_B` two sets of seeds (src/tools/significance.py, seed_sets.py).

This module also compares two runs metric by metric and epoch by epoch (`compare_metrics`),
which `src.tools.reproduce` uses to prove a reproduction.

Exit codes: 0 done, 1 no run matches, 2 a user error (unknown experiment or run, bad filter,
runs validated on different data).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import src.tools.compare_stats as compare_stats
import src.tools.seed_sets as seed_sets
import src.tools.significance as significance
import src.tracking as tracking
from src.config import REPO_ROOT
from src.errors import TrackingError, UserError, print_user_error

# Throughput figures depend on the machine's load, not on the computation; never compared.
WALL_CLOCK_METRICS = ("train_images_per_s", "data_wait_fraction", "checkpoint_seconds")
# Best-epoch summaries, logged once at the end (at the best epoch's step).
SUMMARY_PREFIX = "best_"
# Shown first, in this order; any other best-epoch metric (e.g. of the test set) follows.
BEST_METRICS = ("best_epoch", "best_val_auroc_mean", "best_val_ap_mean", "best_val_loss")
# The run name has its own column; it differs between runs by design.
NOT_COMPARED_PARAMS = ("run.run_name",)
# Columns printed as they are; every other column holds numbers (params are stored as text).
TEXT_COLUMNS = ("run_name", "run_id", "status", "parent")
# What a run without params is, by its tags (the first that it has): (tag, one, many). A
# Demo-4 grid is a sweep tagged `grid`; a set of seeds (--seeds) is tagged `seeds`.
PARENT_KINDS = (
    ("grid", "a grid", "grids"),
    ("sweep.study", "a sweep", "sweeps"),
    ("seeds", "a set of seeds", "sets of seeds"),
)
# Line styles of the curves: a new one after every 20 runs (the colours of tab20).
LINE_STYLES = ("-", "--", ":", "-.")


# ------------------------------------------------------------------ reading the store


def metric_history(uri: str, run_id: str, key: str) -> dict[int, float]:
    """step -> value of one metric; a step logged twice (a resumed run) keeps its last value."""
    history = sorted(tracking.Store(uri).get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


# ------------------------------------------------------------------ two runs, step by step


@dataclass(frozen=True)
class MetricDiff:
    """One metric at one epoch (MLflow step) in run A (the original) and run B (the new one).

    A value is None when that run did not log the metric at that step.
    """

    key: str
    step: int
    original: float | None
    new: float | None

    @property
    def abs_diff(self) -> float:
        """|original - new|; infinite when one side is missing."""
        if self.original is None or self.new is None:
            return math.inf
        return abs(self.original - self.new)


def _last_logged(uri: str, run_id: str, key: str) -> tuple[int, float] | None:
    history = tracking.Store(uri).get_metric_history(run_id, key)
    if not history:
        return None
    last = max(history, key=lambda m: (m.timestamp, m.step))  # one write: the later epoch
    return last.step, last.value


def compare_metrics(uri: str, original_run_id: str, new_run_id: str) -> list[MetricDiff]:
    """Every metric of both runs, step by step, sorted by key then step.

    Wall-clock metrics and MLflow system metrics are left out. A metric or step that only one
    run logged appears with None on the other side. The best-epoch summaries (`best_*`) count
    with their last value only: a finished run that is resumed to train longer logs them
    again at a later step.
    """
    keys = set(tracking.get_run(uri, original_run_id).data.metrics)
    keys |= set(tracking.get_run(uri, new_run_id).data.metrics)
    keys = {k for k in keys if k not in WALL_CLOCK_METRICS and not k.startswith("system/")}
    diffs = []
    for key in sorted(keys):
        if key.startswith(SUMMARY_PREFIX):
            a, b = (_last_logged(uri, r, key) for r in (original_run_id, new_run_id))
            step = a[0] if a else b[0]  # the key exists in at least one of the runs
            diffs.append(MetricDiff(key, step, a and a[1], b and b[1]))
            continue
        a = metric_history(uri, original_run_id, key)
        b = metric_history(uri, new_run_id, key)
        diffs += [MetricDiff(key, s, a.get(s), b.get(s)) for s in sorted(set(a) | set(b))]
    return diffs


# ------------------------------------------------------------------ an experiment's runs


def differing_params(params: list[dict[str, str]]) -> list[str]:
    """The param keys whose values are not the same in every run (absent counts as a value)."""
    keys = sorted({k for p in params for k in p} - set(NOT_COMPARED_PARAMS))
    return [k for k in keys if len({p.get(k) for p in params}) > 1]


def _run_name(uri: str, run_id: str) -> str:
    try:
        return tracking.get_run(uri, run_id).info.run_name
    except TrackingError:  # a parent removed from the store: its id still tells them apart
        return run_id


def runs_table(uri: str, runs: list[Any]) -> Any:
    """A pandas DataFrame with one row per run (see the module docstring for the columns)."""
    import pandas as pd

    params = [r.data.params for r in runs]
    varying = differing_params(params)
    best = [k for k in BEST_METRICS if any(k in r.data.metrics for r in runs)]
    best += sorted(
        {k for r in runs for k in r.data.metrics if k.startswith(SUMMARY_PREFIX) and "/" not in k}
        - set(best)
    )
    parents = {
        r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags
    }
    parent_names = {pid: _run_name(uri, pid) for pid in sorted(parents)}
    rows = []
    for run in runs:
        row = {"run_name": run.info.run_name, "run_id": run.info.run_id, "status": run.info.status}
        if parents:
            row["parent"] = parent_names.get(run.data.tags.get("mlflow.parentRunId"), "")
        row.update({k: run.data.params.get(k, "") for k in varying})
        row.update({k: run.data.metrics.get(k, math.nan) for k in best})
        rows.append(row)
    table = pd.DataFrame(rows)
    if "best_epoch" in table:
        table["best_epoch"] = table["best_epoch"].astype("Int64")  # an epoch, not a float
    return table


def _legend_label(run: Any, varying: list[str], names: list[str]) -> str:
    label = run.info.run_name
    if names.count(label) > 1:
        label += f" ({run.info.run_id[:8]})"
    shown = [f"{k.rsplit('.', 1)[-1]}={_significant(run.data.params.get(k))}" for k in varying[:3]]
    return label + (f"  {', '.join(shown)}" if shown else "")


def curve_styles(n: int) -> list[tuple[tuple[float, ...], str]]:
    """(colour, line style) of n curves, each pair different for up to 80 curves: tab20's
    colours, its dark half first (tab10's colours, matplotlib's default cycle), then its light
    half; after 20 curves the colours come again with the next line style."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    colours = [tab20[i] for i in (*range(0, 20, 2), *range(1, 20, 2))]
    return [(colours[i % 20], LINE_STYLES[i // 20 % len(LINE_STYLES)]) for i in range(n)]


def curves_figure(uri: str, runs: list[Any], metric: str) -> Any:
    """The matplotlib figure of `plot_curves`, or None when no run logged the metric. The
    legend lies below the axes (in two columns from 4 runs on, when the labels are short
    enough), and the figure grows taller to hold it."""
    from matplotlib.ticker import MaxNLocator

    from src.evaluate import pyplot

    plt = pyplot()
    varying = differing_params([r.data.params for r in runs])
    names = [r.info.run_name for r in runs]
    histories = [(run, metric_history(uri, run.info.run_id, metric)) for run in runs]
    histories = [(run, history) for run, history in histories if history]
    if not histories:
        return None
    labels = [_legend_label(run, varying, names) for run, _ in histories]
    # Two columns of up to 60 characters (7 pt) fit the figure's 800 pixels.
    columns = 2 if len(labels) >= 4 and max(map(len, labels)) <= 60 else 1
    rows = math.ceil(len(labels) / columns)
    fig, ax = plt.subplots(figsize=(8, 5 + max(0, rows - 4) * 0.18))
    styles = curve_styles(len(histories))
    for (_, history), label, (colour, style) in zip(histories, labels, styles):
        steps = sorted(history)
        values = [history[s] for s in steps]
        ax.plot(steps, values, marker=".", color=colour, linestyle=style, label=label)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # Below the axes: it never covers a curve, and long labels get the figure's width.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=columns, fontsize=7)
    return fig


def plot_curves(uri: str, runs: list[Any], metric: str, out_path: Path) -> Path | None:
    """One line per run: `metric` over the epochs. None when no run logged the metric."""
    from src.evaluate import save_figure

    fig = curves_figure(uri, runs, metric)
    return None if fig is None else save_figure(fig, out_path)


@dataclass
class CompareOutputs:
    table: Any  # pandas.DataFrame, one row per run
    csv_path: Path
    plot_path: Path | None
    left_out: list[Any]  # the runs without params: parents of sweeps, seeds and grids


def compare_experiment(
    experiment_name: str,
    filter_string: str = "",
    out_dir: str | Path | None = None,
    metric: str = "val_auroc_mean",
    tracking_uri: str | None = None,
) -> CompareOutputs | None:
    """Table, CSV and curve plot of the experiment's runs; None when no run matches."""
    uri = tracking.existing_store(tracking_uri)
    found = tracking.find_runs(uri, experiment_name, filter_string)
    # Parent runs of seeds or grids log no params: their rows would be empty.
    runs = [r for r in found if r.data.params]
    if not runs:
        return None
    out = Path(out_dir) if out_dir else REPO_ROOT / "results" / "compare"
    if not out_dir:
        out = out / tracking.slug(experiment_name)
    out.mkdir(parents=True, exist_ok=True)
    table = runs_table(uri, runs)
    csv_path = out / "runs.csv"
    table.to_csv(csv_path, index=False)
    plot_path = plot_curves(uri, runs, metric, out / f"{tracking.slug(metric)}.png")
    return CompareOutputs(table, csv_path, plot_path, [r for r in found if not r.data.params])


def left_out_text(runs: list[Any]) -> str:
    """The runs without params in words: "the parent run of a sweep", "the parent runs of 2
    grids and a set of seeds; 2 comparisons; a run that logged no params"."""
    counts = Counter(_parent_kind(run.data.tags) for run in runs)
    comparisons = counts.pop("comparison", 0)
    groups = [
        one if counts[one] == 1 else f"{counts[one]} {many}"
        for _, one, many in PARENT_KINDS
        if counts[one]
    ]
    phrases = []
    if groups:
        parents = sum(counts[one] for _, one, _ in PARENT_KINDS)
        phrases.append(f"the parent run{'s' if parents > 1 else ''} of {_and(groups)}")
    if comparisons:
        phrases.append(f"{comparisons} comparisons" if comparisons > 1 else "a comparison")
    if counts[None]:
        n = counts[None]
        phrases.append(
            f"{n} runs that logged no params" if n > 1 else "a run that logged no params"
        )
    return "; ".join(phrases)


def _parent_kind(tags: dict[str, str]) -> str | None:
    if "comparison" in tags:  # a run of --paired or --seed-sets
        return "comparison"
    return next((one for tag, one, _ in PARENT_KINDS if tag in tags), None)


def _and(parts: list[str]) -> str:
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def sweep_table(uri: str, parent_run_id: str) -> Any:
    """One row per trial of the sweep whose parent run is `parent_run_id`, best first:
    trial number, run name and id, how it ended, its sampled values and the objective; for an
    objective with 95% intervals (`best_val_auroc_mean`, `best_val_ap_mean`), `within_noise`
    says whether the trial's value lies inside the best trial's interval: a rough screen of
    the trials that may be as good (`--paired` tests two of them properly)."""
    import pandas as pd

    parent = tracking.get_run(uri, parent_run_id)
    tags = parent.data.tags
    if "sweep.metric" not in tags:
        raise TrackingError(
            f"MLflow run {parent_run_id} is not the parent run of a sweep (it has no "
            "sweep.metric tag); pass the id that `python -m src.sweep` printed."
        )
    metric, keys = f"best_{tags['sweep.metric']}", tags.get("sweep.params", "").split()
    runs = tracking.child_runs(uri, parent_run_id)
    rows = []
    for run in runs:
        row = {
            "trial": int(run.data.tags.get("optuna.trial_number", -1)),
            "run_name": run.info.run_name,
            "run_id": run.info.run_id,
            "status": run.data.tags.get("sweep.status", run.info.status.lower()),
        }
        row.update({k: run.data.params.get(k, "") for k in keys})
        row[metric] = run.data.metrics.get(metric, math.nan)
        row["best_epoch"] = run.data.metrics.get("best_epoch", math.nan)
        row["ci"] = [run.data.metrics.get(f"{metric}_ci_{end}") for end in ("low", "high")]
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", "run_name", "run_id", "status", *keys, metric])
    if rows:
        ascending = tags.get("sweep.direction") == "minimize"
        order = table.sort_values(
            [metric, "trial"], ascending=[ascending, True], na_position="last"
        )
        low, high = rows[order.index[0]]["ci"]
        if low is not None and high is not None:
            table["within_noise"] = table[metric].between(low, high).map({True: "yes", False: ""})
        table = table.loc[order.index]
    return table


# ------------------------------------------------------------------ command line


def table_text(table: Any) -> str:
    """`table` as printed: every column but the names and ids in numbers of 4 significant
    digits (whole numbers whole), missing values as '-'."""
    import pandas as pd

    shown = table.copy()
    for column in shown.columns:
        if column not in TEXT_COLUMNS:
            shown[column] = [_significant(v) for v in shown[column]]
    with pd.option_context("display.width", None, "display.max_columns", None):
        return shown.to_string(index=False)


def _significant(value: Any) -> str:
    """A number, or a param's text that reads as one, to 4 significant digits; other text
    as it is."""
    import pandas as pd

    if pd.isna(value):
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else f"{number:.4g}"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.compare_runs",
        description="Print, save as CSV and plot the runs of one MLflow experiment; or test "
        "whether run B is really better than run A (--paired), or one set of seeds than "
        "another (--seed-sets).",
        epilog="--paired A B: DeLong's paired test of AUROC and a paired bootstrap of AP per "
        "class and for the mean, on the validation predictions both runs logged (refused when "
        "their data fingerprints differ); p-values Holm-corrected across classes; a verdict "
        "line. --seed-sets A B: two parent runs of --seeds; B - A of the mean "
        "best_val_auroc_mean with a bootstrap interval over seeds and the probability that a "
        "seed of B beats a seed of A. Both are logged as an MLflow run of their own in B's "
        "experiment (tag 'comparison'), with a CSV table and a forest plot.",
    )
    parser.add_argument("--experiment", help="the MLflow experiment name")
    parser.add_argument(
        "--sweep", metavar="PARENT_RUN_ID", help="show one sweep's trials, best first"
    )
    parser.add_argument(
        "--paired",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="is run B better than run A on the same validation images? (B - A, per class)",
    )
    parser.add_argument(
        "--seed-sets",
        nargs=2,
        metavar=("PARENT_A", "PARENT_B"),
        help="is the set of seeds B better than A? (the parent run ids that --seeds printed)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="--paired, --seed-sets: the split whose predictions (per-class tables) to compare",
    )
    parser.add_argument(
        "--resamples",
        type=int,
        default=compare_stats.COMPARE_RESAMPLES,
        help="--paired: resamples of the AP bootstrap (default %(default)s)",
    )
    parser.add_argument(
        "--filter",
        default="",
        help='MLflow search filter, e.g. "params.model.model = '
        '\'models.custom_models_base:TinyConv\'" or "metrics.best_val_auroc_mean > 0.8"',
    )
    parser.add_argument(
        "--out",
        help="folder for the table and the plot (default: results/compare/<experiment>, or "
        "results/compare/<paired|seeds>-<A>-<B>)",
    )
    parser.add_argument("--metric", default="val_auroc_mean", help="the per-epoch metric to plot")
    parser.add_argument("--tracking-uri", help="MLflow store (default: as for training)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print the table and where the CSV and plot went; 1 if no run matches, 2 user errors."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.resamples < 1:
        parser.error("--resamples must be at least 1")
    chosen = [f for f in ("experiment", "sweep", "paired", "seed_sets") if getattr(args, f)]
    if len(chosen) > 1 and {"paired", "seed_sets"} & set(chosen):
        shown = " and ".join(f"--{f.replace('_', '-')}" for f in chosen)
        parser.error(f"{shown} are different commands: give one of them")
    if args.paired or args.seed_sets:
        try:
            uri = tracking.existing_store(args.tracking_uri)
            out = Path(args.out) if args.out else None
            if args.paired:
                return significance.show_paired(uri, *args.paired, args.split, args.resamples, out)
            return seed_sets.show_seed_sets(uri, *args.seed_sets, args.split, out)
        except UserError as e:
            return print_user_error(e)
    if args.sweep:
        return show_sweep(args)
    if not args.experiment:
        parser.error("--experiment (or --sweep) is required")
    try:
        outputs = compare_experiment(
            args.experiment, args.filter, args.out, args.metric, args.tracking_uri
        )
    except UserError as e:
        return print_user_error(e)
    if outputs is None:
        what = f" match the filter {args.filter!r}" if args.filter else ""
        print(f"No runs of experiment {args.experiment!r}{what}.", file=sys.stderr)
        return 1
    print(table_text(outputs.table))
    if outputs.left_out:
        print(f"(no params, so left out: {left_out_text(outputs.left_out)})")
    print(f"\nTable: {outputs.csv_path}")
    if outputs.plot_path is not None:
        print(f"Plot:  {outputs.plot_path}")
    else:
        print(f"Plot:  none (no run logged {args.metric!r})")
    return 0


def show_sweep(args: argparse.Namespace) -> int:
    """Print the sweep's trials and write them as sweep.csv (in --out, else the current
    folder's results/compare/sweep-<id>)."""
    try:
        table = sweep_table(tracking.existing_store(args.tracking_uri), args.sweep)
    except UserError as e:
        return print_user_error(e)
    if table.empty:
        print(f"The sweep {args.sweep} has no trials yet.", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else REPO_ROOT / "results" / "compare" / f"sweep-{args.sweep}"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False)
    print(table_text(table))
    print(f"\nTable: {out / 'sweep.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
