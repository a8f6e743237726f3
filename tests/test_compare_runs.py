"""src.tools.compare_runs: an experiment's runs as a table, CSV and plot; two runs step by step;
is B really better than A (two real runs on the same images, two sets of seeds), and the
uncertainty every run logs."""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

import src.stats as stats
import src.tools.compare_stats as compare_stats
import src.tracking as tracking
from src.cli import report
from src.evaluate import pyplot
from src.run_experiment import run
from src.tools.compare_runs import (
    compare_metrics,
    curve_styles,
    curves_figure,
    differing_params,
    main,
)
from tests.command_line import run_here
from tests.test_evaluate import TAB10, count_colour, png_pixels
from tests.test_run_experiment import tiny_config

REPO = Path(__file__).resolve().parent.parent
LRS = {"lr-small": 1e-3, "lr-large": 1e-2}


@pytest.fixture(scope="module")
def lr_pair_store(_store_template, tmp_path_factory):
    """Two real runs of TinyConv, 2 epochs each, lr 1e-3 (lr-small) and 1e-2 (lr-large), in the
    experiment lr-pair of a store of this module: (uri, {name: (config, RunResult)}). Trained
    once for the tests of the table, of the paired test and of the intervals a run logs."""
    folder = tmp_path_factory.mktemp("lr-pair")
    shutil.copy(_store_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    runs = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        for name, lr in LRS.items():
            settings = {"train.epochs": 2, "run.run_name": name, "optimizer.lr": lr}
            config = tiny_config(folder, **settings, **{"run.experiment_name": "lr-pair"})
            runs[name] = (config, run(config))
    return uri, runs


@pytest.fixture
def lr_pair(lr_pair_store, monkeypatch):
    """The module's two runs, their store set as MLFLOW_TRACKING_URI for this test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lr_pair_store[0])
    return lr_pair_store


def test_table_csv_and_plot_of_two_runs_with_different_lr(lr_pair, tmp_path, capsys):
    mlflow_uri, trained = lr_pair
    lrs = LRS
    results = {name: result for name, (_, result) in trained.items()}
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
            at_step = {k: v[step] for k, v in values.items() if v[step] is not None}
            log_now(mlflow_uri, tracker.run_id, at_step, step)
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


def log_now(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """`metrics` at `step`, written to the store before this returns. The tracker's epochs go
    through MLflow's asynchronous queue, whose end waits for its thread's one-second poll: about
    1 s per run, 16 s of the 16 runs below."""
    now = int(time.time() * 1000)
    batch = [Metric(key, value, now, step) for key, value in metrics.items()]
    MlflowClient(uri).log_batch(run_id, metrics=batch)


def logged_runs(uri: str, experiment: str, n: int) -> list[str]:
    """n finished runs of `experiment`, run i with lr = 1.2345678901234e-4 * (i + 1) and
    val_auroc_mean 0.5 + i / 100 + epoch / 1000 at epochs 1 to 3; their ids."""
    ids = []
    for i in range(n):
        params = {"optimizer.lr": 1.2345678901234e-4 * (i + 1), "run.seed": 0}
        tracker = tracking.start(uri, experiment, f"run{i}", {}, params)
        for epoch in (1, 2, 3):
            log_now(uri, tracker.run_id, {"val_auroc_mean": 0.5 + i / 100 + epoch / 1000}, epoch)
        log_now(
            uri, tracker.run_id, {"best_epoch": 3, "best_val_auroc_mean": 0.5 + i / 100 + 0.003}, 3
        )
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


# ------------------------------------------------------------------ what every run logs


def downloaded_table(uri: str, run_id: str, path: str, folder: Path) -> pd.DataFrame:
    with tracking.quiet():  # no download bar
        local = MlflowClient(uri).download_artifacts(run_id, path, str(folder))
    return pd.read_csv(local, dtype={"name": str, "label": str}, keep_default_na=False)


def test_every_run_logs_the_intervals_of_its_auroc_and_ap(lr_pair, tmp_path, capsys):
    uri, trained = lr_pair
    client = MlflowClient(uri)
    for name, (config, result) in trained.items():
        per_class = pd.read_csv(result.results_dir / "tables" / "val_per_class_metrics.csv")
        assert list(per_class.columns) == [
            "label", "positives", "auroc", "auroc_ci_low", "auroc_ci_high",
            "ap", "ap_ci_low", "ap_ci_high", "accuracy",
        ]  # fmt: skip
        for metric in ("auroc", "ap"):
            low, value, high = (per_class[f"{metric}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert ((low <= value) & (value <= high) & (high - low > 0.01)).all()
        # The same figures from the predictions the run logged: DeLong's on the logit scale,
        # and the seeded AP bootstrap of RUN_RESAMPLES resamples.
        preds = downloaded_table(uri, result.run_id, "tables/val_predictions.csv", tmp_path / name)
        labels = preds[[f"label_{x}" for x in per_class["label"]]].to_numpy(dtype=float)
        probs = preds[[f"prob_{x}" for x in per_class["label"]]].to_numpy(dtype=float)
        auroc, auroc_mean = stats.auroc_intervals(labels, probs)
        ap, ap_mean = stats.bootstrap_intervals(labels, probs, n_resamples=stats.RUN_RESAMPLES)
        assert list(per_class["auroc_ci_low"]) == pytest.approx(auroc.low, abs=1e-12)
        assert list(per_class["ap_ci_high"]) == pytest.approx(ap.high, abs=1e-12)
        metrics = client.get_run(result.run_id).data.metrics
        for metric, mean in (("auroc", auroc_mean), ("ap", ap_mean)):
            key = f"best_val_{metric}_mean"
            assert metrics[f"{key}_ci_low"] == pytest.approx(mean.low, abs=1e-12)
            assert metrics[f"{key}_ci_high"] == pytest.approx(mean.high, abs=1e-12)
            assert mean.low < metrics[key] < mean.high
        # The closing line gives each mean with its interval.
        capsys.readouterr()
        report(config, result)
        line = capsys.readouterr().out.strip().splitlines()[0]
        shown = (metrics["best_val_auroc_mean"], auroc_mean.low, auroc_mean.high)
        assert "val_auroc_mean {:.3f} [{:.3f}, {:.3f}], ".format(*shown) in line
        shown = (metrics["best_val_ap_mean"], ap_mean.low, ap_mean.high)
        assert line.endswith("val_ap_mean {:.3f} [{:.3f}, {:.3f}]".format(*shown))


# ------------------------------------------------------------------ is B really better than A?


def comparison_runs(uri: str, **tags: str) -> list:
    """The comparison runs of the store whose tags are `tags` (comparison_a -> comparison.a)."""
    client = MlflowClient(uri)
    where = " and ".join(f"tags.`{k.replace('_', '.')}` = '{v}'" for k, v in tags.items())
    return list(client.search_runs([e.experiment_id for e in client.search_experiments()], where))


def test_two_real_runs_compared_through_the_command_line(lr_pair, tmp_path, capsys, monkeypatch):
    uri, trained = lr_pair
    a, b = (trained[name][1] for name in ("lr-small", "lr-large"))
    out = tmp_path / "paired"
    argv = ["-m", "src.tools.compare_runs", "--paired", a.run_id, b.run_id, "--out", str(out)]
    done = run_here(argv, REPO, capsys, monkeypatch)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[:2] == [f"A: lr-small ({a.run_id})", f"B: lr-large ({b.run_id})"]

    table = pd.read_csv(out / "paired.csv")
    assert list(table["label"]) == ["LabelRed", "LabelBlue", "LabelYellow", "mean"]
    # Each run's AUROC and AP are those its own per-class table gives (scikit-learn's).
    for run_result, side in ((a, "a"), (b, "b")):
        own = pd.read_csv(run_result.results_dir / "tables" / "val_per_class_metrics.csv")
        assert list(table[f"auroc_{side}"][:3]) == pytest.approx(list(own["auroc"]), abs=1e-12)
        assert list(table[f"ap_{side}"][:3]) == pytest.approx(list(own["ap"]), abs=1e-12)
    assert table["auroc_diff"].to_numpy() == pytest.approx(table["auroc_b"] - table["auroc_a"])
    assert (table["auroc_p_holm"][:3] >= table["auroc_p"][:3]).all()
    ap_low, ap_diff, ap_high = (table[f"ap_diff{s}"] for s in ("_ci_low", "", "_ci_high"))
    assert ((ap_low <= ap_diff) & (ap_diff <= ap_high)).all()
    mean = table.iloc[3]
    logged = {r.run_id: MlflowClient(uri).get_run(r.run_id).data.metrics for r in (a, b)}
    diff = logged[b.run_id]["best_val_auroc_mean"] - logged[a.run_id]["best_val_auroc_mean"]
    assert mean["auroc_diff"] == pytest.approx(diff, abs=1e-12)
    significant = table.iloc[:3]["auroc_p_holm"] < 0.05
    better = int((significant & (table.iloc[:3]["auroc_diff"] > 0)).sum())
    worse = int((significant & (table.iloc[:3]["auroc_diff"] < 0)).sum())
    p = mean["auroc_p"]
    p_shown = f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"
    verdict = (
        f"B - A: mean AUROC {diff:+.3f} [{mean['auroc_diff_ci_low']:+.3f}, "
        f"{mean['auroc_diff_ci_high']:+.3f}], p = {p_shown}; better on {better} of 3 classes, "
        f"worse on {worse} (Holm-corrected p < 0.05)"
    )
    assert lines[-1] == verdict

    # Logged as a run of its own in B's experiment, with the table and the forest plot.
    (logged_run,) = comparison_runs(uri, comparison_a=a.run_id, comparison_b=b.run_id)
    assert logged_run.info.status == "FINISHED"
    assert logged_run.info.experiment_id == b.experiment_id
    assert logged_run.data.tags["comparison"] == "paired"
    assert logged_run.data.tags["mlflow.note.content"] == verdict
    assert logged_run.data.metrics["auroc_mean_diff"] == pytest.approx(diff)
    assert logged_run.data.metrics["classes_better"] == better
    files = {f.path for f in MlflowClient(uri).list_artifacts(logged_run.info.run_id, "comparison")}
    assert files == {"comparison/paired.csv", "comparison/forest.png"}
    pixels = png_pixels(out / "forest.png", (1000, 260))  # figsize (10, 1.4 + 0.3 x 4 rows)
    assert (count_colour(pixels, TAB10["C2"], 20) > 0) == (better > 0)  # green: B better


def logged_predictions(uri: str, experiment: str, name: str, table: pd.DataFrame, **tags) -> str:
    """A finished run whose only artifact is the predictions table `table`; its id."""
    tracker = tracking.start(uri, experiment, name, tags)
    tracker.log_text(table.to_csv(index=False), "tables/val_predictions.csv")
    tracker.end()
    return tracker.run_id


def test_a_run_against_itself_and_against_shuffled_predictions(lr_pair, tmp_path, capsys):
    uri, trained = lr_pair
    b = trained["lr-large"][1]
    assert main(["--paired", b.run_id, b.run_id, "--out", str(tmp_path / "self")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == [
        "B - A: mean AP +0.000 [+0.000, +0.000], p = 1.000",
        "B - A: mean AUROC +0.000 [+0.000, +0.000], p = 1.000; better on 0 of 3 classes, "
        "worse on 0 (Holm-corrected p < 0.05)",
    ]
    # Each image given another image's probabilities: the same data, a worse ranking.
    table = downloaded_table(uri, b.run_id, "tables/val_predictions.csv", tmp_path)
    probs = [c for c in table.columns if c.startswith("prob_")]
    order = np.random.default_rng(0).permutation(len(table))
    table[probs] = table[probs].to_numpy()[order]
    fingerprint = MlflowClient(uri).get_run(b.run_id).data.tags["data.val.fingerprint"]
    tags = {"data.val.fingerprint": fingerprint}
    shuffled = logged_predictions(uri, "shuffles", "shuffled", table, **tags)
    assert main(["--paired", b.run_id, shuffled, "--out", str(tmp_path / "shuffled")]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    mean = pd.read_csv(tmp_path / "shuffled" / "paired.csv").iloc[-1]
    assert mean["auroc_diff"] < -0.15 and mean["auroc_diff_ci_high"] < 0
    assert mean["auroc_p"] < 0.01 and mean["ap_p"] < 0.01
    assert verdict.startswith(f"B - A: mean AUROC {mean['auroc_diff']:+.3f} [")
    assert "better on 0 of 3 classes" in verdict
    (logged_run,) = comparison_runs(uri, comparison_a=b.run_id, comparison_b=shuffled)
    assert logged_run.info.run_name == "compare lr-large vs shuffled"


def test_runs_on_other_data_or_without_predictions_are_refused_in_one_line(
    lr_pair, tmp_path, capsys
):
    uri, trained = lr_pair
    a = trained["lr-small"][1]
    table = downloaded_table(uri, a.run_id, "tables/val_predictions.csv", tmp_path)
    other = logged_predictions(
        uri, "others", "other-data", table, **{"data.val.fingerprint": "0123456789abcdef"}
    )
    renamed = logged_predictions(uri, "others", "renamed", table.assign(name=table["name"] + "x"))
    empty = logged_predictions(uri, "others", "empty", table.iloc[:0])
    tracker = tracking.start(uri, "others", "no-predictions", {})
    tracker.end()
    expected = {
        other: f"error: Runs A ({a.run_id}) and B ({other}) were validated on different data "
        "(data.val.fingerprint ",
        renamed: f"error: Runs A ({a.run_id}) and B ({renamed}) predicted different val images",
        tracker.run_id: f"error: MLflow run {tracker.run_id} (no-predictions) has no artifact "
        "tables/val_predictions.csv; ",
        "0" * 32: "error: MLflow run '00000000000000000000000000000000' is not in the store",
    }
    for run_b, start in expected.items():
        assert main(["--paired", a.run_id, run_b, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(start) and "\n" not in err, err
    assert main(["--paired", a.run_id, empty]) == 2  # no images: not the same as A's
    assert "predicted different val images" in capsys.readouterr().err
    for refused in [*expected, empty]:  # nothing logged when refused
        assert comparison_runs(uri, comparison_b=refused) == []


def logged_seed_set(
    uri: str, name: str, values: list[float], classes=("x", "y"), fingerprint="f" * 16
) -> str:
    """A finished parent run of --seeds with one finished child per value: best_val_auroc_mean
    = value and a per-class table (first class: AUROC = value, AP = value - 0.2; second class:
    0.1 lower each); the parent's id."""
    seeds = " ".join(map(str, range(len(values))))
    parent = tracking.start(uri, "seed-sets", name, {"seeds": seeds})
    for seed, value in enumerate(values):
        tags = {"mlflow.parentRunId": parent.run_id, "data.val.fingerprint": fingerprint}
        child = tracking.start(uri, "seed-sets", f"{name}-seed{seed}", tags, {"run.seed": seed})
        log_now(uri, child.run_id, {"best_val_auroc_mean": value}, 1)
        per_class = pd.DataFrame(
            {"label": classes, "auroc": [value, value - 0.1], "ap": [value - 0.2, value - 0.3]}
        )
        child.log_text(per_class.to_csv(index=False), "tables/val_per_class_metrics.csv")
        child.end()
    parent.end()
    return parent.run_id


def test_two_sets_of_seeds(mlflow_uri, tmp_path, capsys):
    a = logged_seed_set(mlflow_uri, "a-seeds", [0.80, 0.82])
    b = logged_seed_set(mlflow_uri, "b-seeds", [0.83, 0.81, 0.85])
    assert main(["--seed-sets", a, b, "--out", str(tmp_path / "seeds")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = compare_stats.compare_groups([0.80, 0.82], [0.83, 0.81, 0.85])
    low, high = expected.difference.low, expected.difference.high
    assert lines[-4:] == [
        f"A: a-seeds ({a}): 2 seeds, best_val_auroc_mean 0.810 +- 0.014 (sd)",
        f"B: b-seeds ({b}): 3 seeds, best_val_auroc_mean 0.830 +- 0.020 (sd)",
        # 0.83 - 0.81; B's 0.83 and 0.85 beat both of A's seeds, 0.81 one: 5 of 6 pairs.
        f"B - A: best_val_auroc_mean +0.020 [{low:+.3f}, {high:+.3f}] (bootstrap over seeds); "
        "a seed of B beats a seed of A with probability 0.83",
        "note: 2 and 3 seeds: with fewer than 5 a side, the bootstrap over seeds is rough (its "
        "interval is too narrow); run more seeds for a firm answer.",
    ]
    assert -0.01 < low < 0.02 < high < 0.045
    per_class = pd.read_csv(tmp_path / "seeds" / "seeds_per_class.csv")
    assert list(per_class["label"]) == ["x", "y", "mean"]
    assert list(per_class["auroc_diff"]) == pytest.approx([0.02, 0.02, 0.02])
    assert list(per_class["ap_diff"]) == pytest.approx([0.02, 0.02, 0.02])
    seeds = pd.read_csv(tmp_path / "seeds" / "seeds.csv")
    assert list(seeds["set"]) == ["A", "A", "B", "B", "B"] and list(seeds["seed"]) == [
        0,
        1,
        0,
        1,
        2,
    ]
    (logged_run,) = comparison_runs(mlflow_uri, comparison="seeds")
    assert logged_run.data.tags["comparison.a"] == a and logged_run.data.tags["comparison.b"] == b
    assert logged_run.data.metrics["prob_b_beats_a"] == pytest.approx(5 / 6)
    assert logged_run.data.metrics["mean_diff"] == pytest.approx(0.02)
    files = {
        f.path
        for f in MlflowClient(mlflow_uri).list_artifacts(logged_run.info.run_id, "comparison")
    }
    assert files == {
        "comparison/seeds.csv",
        "comparison/seeds_per_class.csv",
        "comparison/forest.png",
    }

    # A run that is no set of seeds: one line.
    child = seeds["run_id"][0]
    assert main(["--seed-sets", child, b]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: MLflow run {child} is not the parent run of a set of seeds (it has no seeds "
        "tag); pass the ids printed as 'Parent run of the N seeds: <id>'."
    )
    # Seeds validated on other data, or with other classes: one line each.
    other_data = logged_seed_set(mlflow_uri, "other-data", [0.9], fingerprint="0" * 16)
    other_classes = logged_seed_set(mlflow_uri, "other-classes", [0.9], classes=("x", "z"))
    for other, message in (
        (other_data, f"error: The child runs of {a} and {other_data} were validated on "
         "different data (data.val.fingerprint: 0000000000000000, ffffffffffffffff); "),
        (other_classes, "error: The child runs of the two sets of seeds have different classes"),
    ):  # fmt: skip
        assert main(["--seed-sets", a, other]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and "\n" not in err, err
    # Comparisons are runs without params: the table of the experiment names them.
    assert main(["--experiment", "seed-sets", "--out", str(tmp_path / "table")]) == 0
    assert "(no params, so left out: the parent runs of 4 sets of seeds; a comparison)" in (
        capsys.readouterr().out
    )


def test_a_sweep_marks_the_trials_within_the_best_trials_interval(mlflow_uri, tmp_path, capsys):
    tags = {"sweep.metric": "val_auroc_mean", "sweep.direction": "maximize",
            "sweep.params": "optimizer.lr", "sweep.study": "s"}  # fmt: skip
    parent = tracking.start(mlflow_uri, "sweeps", "s-sweep", tags)
    # (lr, best_val_auroc_mean, its interval): the best is 0.90 [0.85, 0.94].
    trials = [(0.1, 0.86, 0.80, 0.91), (0.01, 0.90, 0.85, 0.94), (0.001, 0.84, 0.78, 0.89)]
    for number, (lr, value, low, high) in enumerate(trials):
        trial_tags = {"mlflow.parentRunId": parent.run_id, "optuna.trial_number": number}
        child = tracking.start(mlflow_uri, "sweeps", f"t{number}", trial_tags, {"optimizer.lr": lr})
        metrics = {"best_val_auroc_mean": value}
        metrics |= {"best_val_auroc_mean_ci_low": low, "best_val_auroc_mean_ci_high": high}
        log_now(mlflow_uri, child.run_id, metrics, 1)
        child.end()
    parent.end()
    assert main(["--sweep", parent.run_id, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-2:] == ["best_val_auroc_mean", "within_noise"]
    # 0.86 lies inside [0.85, 0.94], 0.84 below it.
    assert [line.split()[-2:] for line in out[1:3]] == [["0.9", "yes"], ["0.86", "yes"]]
    assert out[3].split()[-1] == "0.84"
    rows = pd.read_csv(tmp_path / "sweep.csv", keep_default_na=False)
    assert list(rows["trial"]) == [1, 0, 2] and list(rows["within_noise"]) == ["yes", "yes", ""]
