"""src.tools.compare_runs: an experiment's runs as a table, CSV and plot; two runs step by step."""

from __future__ import annotations

import csv
import math

import pytest
from matplotlib.colors import to_hex
from mlflow.tracking import MlflowClient

import src.tracking as tracking
from src.evaluate import pyplot
from src.run_experiment import run
from src.tools.compare_runs import (
    compare_metrics,
    curve_styles,
    curves_figure,
    differing_params,
    main,
)
from tests.test_evaluate import TAB10, count_colour, png_pixels
from tests.test_run_experiment import tiny_config


def test_table_csv_and_plot_of_two_runs_with_different_lr(mlflow_uri, tmp_path, capsys):
    lrs = {"lr-small": 1e-3, "lr-large": 1e-2}
    results = {
        name: run(
            tiny_config(
                tmp_path,
                **{
                    "train.epochs": 2,
                    "run.run_name": name,
                    "run.experiment_name": "lr-pair",
                    "optimizer.lr": lr,
                },
            )
        )
        for name, lr in lrs.items()
    }
    out = tmp_path / "compare"
    assert main(["--experiment", "lr-pair", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lr-small" in printed and "lr-large" in printed and "optimizer.lr" in printed

    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run_name"] for r in rows] == ["lr-small", "lr-large"]  # oldest first
    columns = list(rows[0])
    assert columns[:3] == ["run_name", "run_id", "status"]
    # optimizer.lr is the only param that differs (the run name has its own column); the
    # best-epoch metrics follow, the usual ones first.
    assert columns[3:8] == [
        "optimizer.lr",
        "best_epoch",
        "best_val_auroc_mean",
        "best_val_ap_mean",
        "best_val_loss",
    ]
    assert all(c.startswith("best_val_") for c in columns[8:])
    client = MlflowClient(mlflow_uri)
    for row in rows:
        logged = client.get_run(results[row["run_name"]].run_id).data
        assert row["run_id"] == results[row["run_name"]].run_id and row["status"] == "FINISHED"
        assert float(row["optimizer.lr"]) == lrs[row["run_name"]]
        assert int(row["best_epoch"]) == results[row["run_name"]].best_epoch
        for key in ("best_val_auroc_mean", "best_val_ap_mean", "best_val_loss"):
            assert float(row[key]) == pytest.approx(logged.metrics[key], rel=1e-12)
    # figsize (8, 5) at 100 dpi; one line per run in the first two colours of the cycle.
    pixels = png_pixels(out / "val_auroc_mean.png", (800, 500))
    assert count_colour(pixels, TAB10["C0"]) > 100 and count_colour(pixels, TAB10["C1"]) > 100
    assert count_colour(pixels, TAB10["C2"]) == 0  # two runs, no third line

    # An MLflow filter picks one run; the default folder is results/compare/<experiment>.
    assert main(["--experiment", "lr-pair", "--filter", "params.optimizer.lr = '0.01'",
                 "--out", str(tmp_path / "one")]) == 0  # fmt: skip
    with open(tmp_path / "one" / "runs.csv") as f:
        (only,) = list(csv.DictReader(f))
    assert only["run_name"] == "lr-large" and "optimizer.lr" not in only  # nothing differs
    assert main(["--experiment", "lr-pair", "--filter", "params.optimizer.lr = '5'"]) == 1


def test_unknown_experiment_or_bad_filter_is_one_line_and_exit_2(mlflow_uri, capsys):
    tracking.start(mlflow_uri, "exists", "r", {}).end()
    assert main(["--experiment", "no-such-experiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: There is no MLflow experiment named 'no-such-experiment'")
    assert "exists" in err and "\n" not in err
    assert main(["--experiment", "exists", "--filter", "params.x ==== 3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --filter 'params.x ==== 3' is not a valid") and "\n" not in err


def test_differing_params_keeps_only_keys_that_vary():
    params = [
        {"optimizer.lr": "0.001", "run.seed": "0", "run.run_name": "a", "data.args.x": "1"},
        {"optimizer.lr": "0.01", "run.seed": "0", "run.run_name": "b"},
    ]
    assert differing_params(params) == ["data.args.x", "optimizer.lr"]
    assert differing_params(params[:1]) == []


def test_compare_metrics_step_by_step(mlflow_uri):
    def logged(values: dict[str, list[float | None]]) -> str:
        tracker = tracking.start(mlflow_uri, "diff", "r", {})
        for step in range(3):
            tracker.log_epoch({k: v[step] for k, v in values.items() if v[step] is not None}, step)
        tracker.end()
        return tracker.run_id

    # The original logged its best-epoch summary twice (finished, then resumed for longer).
    a = logged(
        {
            "val_loss": [0.5, 0.4, 0.3],
            "train_images_per_s": [10, 20, 30],
            "x": [1.0, None, None],
            "best_val_loss": [None, 0.4, 0.3],
        }
    )
    b = logged(
        {
            "val_loss": [0.5, 0.45, 0.3],
            "train_images_per_s": [11, 21, 31],
            "x": [None, None, None],
            "best_val_loss": [None, None, 0.3],
        }
    )
    diffs = compare_metrics(mlflow_uri, a, b)
    # Wall-clock throughput is left out; x exists in the original only; the summary counts
    # with its last value.
    assert [(d.key, d.step) for d in diffs] == [
        ("best_val_loss", 2),
        ("val_loss", 0),
        ("val_loss", 1),
        ("val_loss", 2),
        ("x", 0),
    ]
    assert [d.abs_diff for d in diffs[:4]] == [0.0, 0.0, pytest.approx(0.05), 0.0]
    assert diffs[4].original == 1.0 and diffs[4].new is None and math.isinf(diffs[4].abs_diff)


def logged_runs(uri: str, experiment: str, n: int) -> list[str]:
    """n finished runs of `experiment`, run i with lr = 1.2345678901234e-4 * (i + 1) and
    val_auroc_mean 0.5 + i / 100 + epoch / 1000 at epochs 1 to 3; their ids."""
    ids = []
    for i in range(n):
        params = {"optimizer.lr": 1.2345678901234e-4 * (i + 1), "run.seed": 0}
        tracker = tracking.start(uri, experiment, f"run{i}", {}, params)
        for epoch in (1, 2, 3):
            tracker.log_epoch({"val_auroc_mean": 0.5 + i / 100 + epoch / 1000}, epoch)
        tracker.log_epoch({"best_epoch": 3, "best_val_auroc_mean": 0.5 + i / 100 + 0.003}, 3)
        tracker.end()
        ids.append(tracker.run_id)
    return ids


def test_curve_styles_are_distinct_for_20_colours_then_change_line_style():
    styles = curve_styles(24)
    colours = [to_hex(colour) for colour, _ in styles]
    # tab10's colours first (matplotlib's default cycle), then their light shades from tab20.
    assert colours[:3] == ["#1f77b4", "#ff7f0e", "#2ca02c"]
    assert colours[10:12] == ["#aec7e8", "#ffbb78"]
    assert len(set(colours[:20])) == 20 and {s for _, s in styles[:20]} == {"-"}
    assert styles[20] == (styles[0][0], "--") and styles[23] == (styles[3][0], "--")
    assert len(set(styles)) == 24


def test_legend_lies_below_the_axes_and_16_curves_have_16_colours(mlflow_uri):
    logged_runs(mlflow_uri, "many", 16)
    runs = tracking.find_runs(mlflow_uri, "many")
    fig = curves_figure(mlflow_uri, runs, "val_auroc_mean")
    fig.tight_layout()  # as the PNG is saved
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.y1 < box.y0  # below the axes: it covers no curve
    width, height = fig.canvas.get_width_height()
    assert 0 <= legend.x0 and legend.x1 <= width and 0 <= legend.y0  # inside the figure
    assert len({to_hex(line.get_color()) for line in ax.get_lines()}) == 16
    # The labels give lr to 4 significant digits, not as MLflow stores it.
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0] == "run0  lr=0.0001235" and labels[15] == "run15  lr=0.001975"
    pyplot().close(fig)


def test_printed_numbers_have_4_significant_digits_and_left_out_parents_are_named(
    mlflow_uri, tmp_path, capsys
):
    logged_runs(mlflow_uri, "groups", 2)
    tracking.start(mlflow_uri, "groups", "s-sweep", {"sweep.study": "s"}).end()
    assert main(["--experiment", "groups", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["run_name", "run_id", "status", "optimizer.lr", "best_epoch",
                              "best_val_auroc_mean"]  # fmt: skip
    assert out[1].split()[3:] == ["0.0001235", "3", "0.503"]
    assert out[2].split()[3:] == ["0.0002469", "3", "0.513"]
    assert out[3] == "(no params, so left out: the parent run of a sweep)"
    with open(tmp_path / "a" / "runs.csv") as f:  # the CSV keeps every digit
        rows = list(csv.DictReader(f))
    assert float(rows[1]["optimizer.lr"]) == 1.2345678901234e-4 * 2

    tracking.start(mlflow_uri, "groups", "g-grid", {"sweep.study": "g", "grid": "a x b"}).end()
    tracking.start(mlflow_uri, "groups", "seeds", {"seeds": "0 1"}).end()
    tracking.start(mlflow_uri, "groups", "s2-sweep", {"sweep.study": "s2"}).end()
    tracking.start(mlflow_uri, "groups", "empty", {}).end()
    assert main(["--experiment", "groups", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[3] == (
        "(no params, so left out: the parent runs of a grid, 2 sweeps and a set of seeds; "
        "a run that logged no params)"
    )
