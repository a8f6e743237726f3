"""src.run_experiment end to end on the shipped TinyData with a real SQLite MLflow store."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import src.config as cfg
from src.run_experiment import run
from src.train.checkpoint import CheckpointError
from tests.command_line import run_here

REPO = Path(__file__).resolve().parent.parent
DEMO2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
LABELS = ["LabelRed", "LabelBlue", "LabelYellow"]


# Flags for a Demo run whose test is not about the end-of-run MLflow model and heatmaps (what
# tiny_config leaves out too; tests/test_model_package.py and test_explain.py check them).
QUICK_END = ["--set", "run.log_model=false", "--set", "explain.gallery=false"]


def tiny_config(tmp_path: Path, **overrides) -> cfg.ExperimentConfig:
    base = {
        "train.epochs": 3,
        "train.patience": 0,
        "run.results_dir": str(tmp_path / "results"),
        "run.experiment_name": "tiny-test",
        "run.device": "cpu",
        # What the tests of the end-of-run model and heatmaps check (and one run here).
        "run.log_model": False,
        "explain.gallery": False,
    }
    return cfg.load(DEMO2, {**base, **overrides})


def metric_series(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def all_series(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = client.get_run(run_id).data.metrics
    wall = (
        "train_images_per_s",
        "data_wait_fraction",
        "checkpoint_seconds",
    )  # wall-clock figures differ per run, as MLflow's system metrics (system/...) do
    return {
        k: metric_series(client, run_id, k)
        for k in keys
        if k not in wall and not k.startswith("system/")
    }


def test_one_run_with_every_metric_and_artifact(mlflow_uri, tmp_path):
    result = run(tiny_config(tmp_path, **{"run.log_model": True, "explain.gallery": True}))
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([result.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]
    assert runs[0].info.status == "FINISHED"
    keys = [
        "train_loss",
        "val_loss",
        "val_auroc_mean",
        "val_ap_mean",
        "train_images_per_s",
        "data_wait_fraction",
    ]
    keys += [f"val_auroc/{label}" for label in LABELS] + [f"val_ap/{label}" for label in LABELS]
    for key in keys:
        assert [s for s, _ in metric_series(client, result.run_id, key)] == [1, 2, 3], key
    params = runs[0].data.params
    assert params["model.model"] == "models.custom_models_base:TinyConv"
    assert params["train.epochs"] == "3"
    assert runs[0].data.tags["data.train.count"] == "150"

    assert set(artifacts(client, result.run_id)) >= END_OF_RUN_ARTIFACTS
    check_the_logged_model_holds_best_pt(client, result.experiment_id, result.run_id)
    assert (result.results_dir / "best.pt").is_file() and (result.results_dir / "last.pt").is_file()
    with open(result.results_dir / "tables" / "val_predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 50
    assert set(rows[0]) == {"name"} | {f"prob_{x}" for x in LABELS} | {f"label_{x}" for x in LABELS}
    assert rows == sorted(rows, key=lambda r: r["name"])


END_OF_RUN_ARTIFACTS = {
    "config/config.toml",
    "plots/learning_curves.png",
    "plots/val/roc.png",
    "plots/val/pr.png",
    "tables/val_predictions.csv",
    "tables/val_per_class_metrics.csv",
    "tables/thresholds.csv",
    "plots/explanations.png",
}


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    """The paths of every artifact file of a run."""
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def check_the_logged_model_holds_best_pt(client, experiment_id: str, run_id: str) -> None:
    """The run's MLflow model `model` (runs:/<id>/model) holds the best weights."""
    (model,) = client.search_logged_models(experiment_ids=[experiment_id])
    assert (model.name, model.source_run_id) == ("model", run_id)
    files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert {"MLmodel", "artifacts"} <= files
    weights = client.list_logged_model_artifacts(model.model_id, "artifacts")
    assert [a.path for a in weights] == ["artifacts/best.pt"]


def test_early_stopping_stops_after_patience(mlflow_uri, tmp_path):
    # lr = 0: the weights never change, so val_loss improves only at epoch 1 (the first).
    result = run(
        tiny_config(tmp_path, **{"optimizer.lr": 0.0, "train.epochs": 10, "train.patience": 2})
    )
    client = MlflowClient(mlflow_uri)
    assert [s for s, _ in metric_series(client, result.run_id, "val_loss")] == [1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1 and result.epochs_run == 3
    assert [s for s, _ in metric_series(client, result.run_id, "best_epoch")] == [1]
    assert torch.load(result.results_dir / "last.pt", weights_only=True)["epoch"] == 3
    assert torch.load(result.results_dir / "best.pt", weights_only=True)["epoch"] == 1


def test_same_seed_same_metrics_with_0_and_2_workers(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    # Two epochs: the second one draws a new order of the training set.
    first = run(tiny_config(tmp_path, **{"run.run_name": "a", "train.epochs": 2}))
    two = {"run.run_name": "b", "data.num_workers": 2, "train.epochs": 2}
    second = run(tiny_config(tmp_path, **two))
    a, b = all_series(client, first.run_id), all_series(client, second.run_id)
    assert len(a["train_loss"]) == 2 and a == b  # bit for bit
    other = run(tiny_config(tmp_path, **{"run.run_name": "c", "run.seed": 1, "train.epochs": 2}))
    assert all_series(client, other.run_id)["train_loss"] != a["train_loss"]


@pytest.mark.slow
# Demo-2 runs as a process in test_resilience.py too; here the script runs in-process.
@pytest.mark.parametrize("demo", ["Demo-1-TinyConvWithoutSequential-TinyData.py"])
def test_demo_scripts_run(mlflow_uri, tmp_path, demo, capsys, monkeypatch):
    args = ["--epochs", "1", "--results-dir", str(tmp_path / "r"), "--experiment-name", "demo-test"]
    out = run_here([str(REPO / demo), *args], tmp_path, capsys, monkeypatch)
    assert out.returncode == 0, out.stderr
    assert "val_auroc_mean" in out.stdout and "ui --backend-store-uri" in out.stdout
    runs = MlflowClient(mlflow_uri).search_runs(
        [MlflowClient(mlflow_uri).get_experiment_by_name("demo-test").experiment_id]
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_predict_on_valid_and_test_reuse_the_best_weights(mlflow_uri, tmp_path):
    trained = run(tiny_config(tmp_path, **{"run.use_test_set": True}))
    client = MlflowClient(mlflow_uri)
    best_val = client.get_run(trained.run_id).data.metrics["best_val_auroc_mean"]
    best_test = client.get_run(trained.run_id).data.metrics["best_test_auroc_mean"]
    for task, split, expected in [
        ("predict_on_valid", "val", best_val),
        ("predict_on_test", "test", best_test),
    ]:
        config = tiny_config(
            tmp_path,
            **{
                "run.task": task,
                "run.use_test_set": True,
                "run.checkpoint": str(trained.results_dir),
                "run.run_name": task,
            },
        )
        result = run(config)
        assert result.best_epoch == trained.best_epoch
        # The same weights on the same split: the same figure as the training run's summary.
        assert result.best_metrics[f"{split}_auroc_mean"] == pytest.approx(expected, abs=1e-12)
        table = result.results_dir / "tables" / f"{split}_predictions.csv"
        assert len(table.read_text().splitlines()) == 1 + 50
        run_report(config, result)


def run_report(config: cfg.ExperimentConfig, result) -> None:
    import contextlib
    import io

    from src.cli import report

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        report(config, result)
    split = "val" if config.run.task == "predict_on_valid" else "test"
    line = buffer.getvalue().strip().splitlines()[0]
    assert f"{split}_auroc_mean {result.best_metrics[f'{split}_auroc_mean']:.4f}" in line
    assert "nan" not in line


def test_predict_with_weights_of_another_model_is_one_clear_error(mlflow_uri, tmp_path):
    trained = run(tiny_config(tmp_path, **{"train.epochs": 1}))
    config = tiny_config(
        tmp_path,
        **{
            "run.task": "predict_on_valid",
            "run.checkpoint": str(trained.results_dir),
            "model.model": "models.custom_models_base:TinyConvWithoutSequential",
        },
    )
    with pytest.raises(
        CheckpointError, match=r"model\.model = 'models\.custom_models_base:TinyConv'"
    ):
        run(config)


def test_amp_and_channels_last_are_no_ops_on_the_cpu(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    plain = run(tiny_config(tmp_path, **{"train.epochs": 2, "run.run_name": "plain"}))
    switches = {"train.amp": "bf16", "train.channels_last": True, "train.cudnn_benchmark": True}
    fast = run(tiny_config(tmp_path, **{"train.epochs": 2, "run.run_name": "fast", **switches}))
    assert client.get_run(fast.run_id).data.params["train.amp"] == "bf16"
    a, b = all_series(client, plain.run_id), all_series(client, fast.run_id)
    assert "val_auroc_mean" in a and len(a["train_loss"]) == 2
    assert a == b  # bit for bit


def test_epochs_count_from_1_in_every_place_a_person_reads_them(mlflow_uri, tmp_path, capsys):
    from src.cli import report

    config = tiny_config(tmp_path, **{"train.epochs": 3})
    result = run(config)
    client = MlflowClient(mlflow_uri)
    val_loss = metric_series(client, result.run_id, "val_loss")
    best = min(val_loss, key=lambda sv: sv[1])
    # best_epoch is the epoch of the lowest val_loss, logged at that epoch's step.
    assert result.best_epoch == best[0]
    assert metric_series(client, result.run_id, "best_epoch") == [(best[0], float(best[0]))]
    assert torch.load(result.results_dir / "best.pt", weights_only=True)["epoch"] == best[0]
    out = capsys.readouterr().out
    assert "epoch   1/3" in out and "epoch   3/3" in out and "epoch   0/" not in out
    report(config, result)
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith(f"Best epoch (lowest val_loss): {best[0]} of 3: val_loss {best[1]:.4f}")


@pytest.mark.slow
def test_the_command_line_loads_each_module_once(mlflow_uri, tmp_path):
    """A whole run, as `python -m src.run_experiment`: no module of ours is loaded twice
    (run as __main__, src.run_experiment must not be imported again under its own name).
    MLflow is imported in the training process (src/tracking.py), which logs everything, the
    MLflow model included; no other process is started for it."""
    loaded = _imported(
        ["-m", "src.run_experiment", str(DEMO2), "--epochs", "1", "--max-batches", "1"]
        + ["--results-dir", str(tmp_path / "r")]
    )
    ours = [m for m in loaded if m.split(".")[0] in ("src", "load_dataset", "models")]
    assert "src.train.experiment" in ours and "src.cli" in ours
    assert "src.run_experiment" not in ours
    assert len(ours) == len(set(ours)), sorted(m for m in ours if ours.count(m) > 1)
    assert "src.tracking" in ours and "mlflow" in loaded
    assert "src.tracking_service" not in ours
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("Demo-2-TinyConv-TinyData").experiment_id
    (run,) = client.search_runs([experiment])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert "val_loss" in run.data.metrics and "data.train.fingerprint" in run.data.tags
    assert set(artifacts(client, run.info.run_id)) >= END_OF_RUN_ARTIFACTS
    check_the_logged_model_holds_best_pt(client, experiment, run.info.run_id)
    assert not _processes_naming(mlflow_uri), "a process of the run outlived it"


def _processes_naming(text: str) -> list[str]:
    """Command lines of this machine's processes that contain `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # ended meanwhile
            continue
        line = " ".join(a.decode(errors="replace") for a in argv)
        if text in line and "pytest" not in line:
            found.append(line)
    return found


def test_help_lists_the_folder_flags_of_the_experiments_dataset(tmp_path, capsys, monkeypatch):
    """`--help` of a Demo names its dataset's folder flags, read from the dataset class."""
    out = run_here(
        [str(REPO / "Demo-2-TinyConv-TinyData.py"), "--help"], tmp_path, capsys, monkeypatch
    )
    assert out.returncode == 0, out.stderr
    assert "folders of the dataset load_dataset.custom_tiny:TinyData" in out.stdout
    assert "--data-dir DIR" in out.stdout and "tiny_labels.csv" in out.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "optimizer.lr=nan"], "error: Config key [optimizer] lr = nan must be a finite"),
        (["--set", "train.epochz=3"], "error: Unknown config key [train] epochz; allowed keys"),
        (["--epochs", "x"], "error: argument --epochs: invalid int value: 'x'"),
        (["--bogus", "3"], "error: --bogus is not a flag of this command and does not apply"),
    ],
)
def test_a_bad_key_or_flag_is_one_line_with_exit_code_2(
    args, expected, tmp_path, capsys, monkeypatch
):
    """A bad key or a bad flag: one line naming it, exit code 2, no traceback, nothing run."""
    demo = [str(REPO / "Demo-2-TinyConv-TinyData.py"), "--results-dir", str(tmp_path / "r")]
    out = run_here([*demo, *args], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(expected), line
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()


def _imported(args: list[str]) -> list[str]:
    """The modules a `python ARGS` process imports, in order (`-X importtime`)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode in (0, 2), out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("import time:")]
    return [line.rsplit("|", 1)[-1].strip() for line in lines]


def test_a_log_file_gets_progress_lines_while_an_epoch_trains(mlflow_uri, tmp_path):
    """Under nohup or sbatch (output to a file) a bar prints nothing until the epoch ends: a
    line every `run.progress_every_s` seconds says how far it is."""
    import contextlib
    import re

    log = tmp_path / "nohup.out"
    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        run(tiny_config(tmp_path, **{"train.epochs": 1, "run.progress_every_s": 1e-6}))
    out = log.read_text()
    assert "\r" not in out  # no bar: a log file gets whole lines
    lines = [line for line in out.splitlines() if line.startswith("epoch 1/1: batch ")]
    assert lines, out
    pattern = r"epoch 1/1: batch \d/9, [\d,]+ images, \d+ img/s, loss \d\.\d{4}, epoch ETA \d+ s"
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[-1].startswith("epoch 1/1: batch 9/9, 144 images")


def test_keep_last_pt_false_leaves_only_best_pt_once_the_run_finished(mlflow_uri, tmp_path):
    result = run(tiny_config(tmp_path, **{"train.epochs": 2, "run.keep_last_pt": False}))
    assert sorted(p.name for p in result.results_dir.glob("*.pt")) == ["best.pt"]
    assert MlflowClient(mlflow_uri).get_run(result.run_id).info.status == "FINISHED"


def test_resuming_a_finished_run_that_has_nothing_left_to_train_is_one_line(mlflow_uri, tmp_path):
    """--epochs not above what a FINISHED run trained, or its early stop unchanged: one line,
    nothing logged, the run stays FINISHED; a larger --epochs trains on."""
    from src.errors import ConfigError

    first = run(tiny_config(tmp_path, **{"train.epochs": 2}))
    client = MlflowClient(mlflow_uri)
    before = client.get_run(first.run_id)
    last = (first.results_dir / "last.pt").read_bytes()
    for epochs in (2, 1):
        with pytest.raises(ConfigError, match="finished after 2 epochs and --epochs is"):
            run(tiny_config(tmp_path, **{"train.epochs": epochs}), resume=first.results_dir)
    after = client.get_run(first.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags
    assert (first.results_dir / "last.pt").read_bytes() == last
    longer = run(tiny_config(tmp_path, **{"train.epochs": 3}), resume=first.results_dir)
    assert longer.run_id == first.run_id and longer.epochs_run == 3


def test_resuming_an_early_stopped_run_needs_a_larger_patience(mlflow_uri, tmp_path):
    """lr 0.5 makes val_loss rise at epoch 3 of 10: with patience 1 the run stops early there.
    Resumed with the same patience there is nothing to train (one line); a larger one trains on."""
    from src.errors import ConfigError

    settings = {"train.epochs": 10, "train.patience": 1, "optimizer.lr": 0.5}
    first = run(tiny_config(tmp_path, **settings))
    assert first.stopped_early and first.epochs_run == 3
    with pytest.raises(ConfigError, match="stopped early by patience 1: there is nothing"):
        run(tiny_config(tmp_path, **settings), resume=first.results_dir)
    assert MlflowClient(mlflow_uri).get_run(first.run_id).info.status == "FINISHED"
    more = {**settings, "train.patience": 0, "train.epochs": 5}
    more = run(tiny_config(tmp_path, **more), resume=first.results_dir)
    assert more.run_id == first.run_id and more.epochs_run == 5


def gapped_tiny_folder(root: Path, val: dict[str, tuple[int, int, int]]) -> Path:
    from tests.tiny_fixtures import write_tiny_folder

    train = {"a.png": (1, 0, 1), "b.png": (0, 1, 0), "c.png": (1, 1, 0), "d.png": (0, 0, 1)}
    return write_tiny_folder(root, {"train": train, "val": val})


def test_classes_without_a_positive_or_a_negative_in_val_are_said_tagged_and_counted(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """Val: LabelRed in every image (no negative), LabelYellow in none (no positive): their
    AUROC is undefined, and the means are LabelBlue's alone."""
    val = {"e.png": (1, 1, 0), "f.png": (1, 0, 0), "g.png": (1, 1, 0)}
    data = gapped_tiny_folder(tmp_path / "tiny", val)
    demo = [str(REPO / "Demo-2-TinyConv-TinyData.py"), "--data-dir", str(data), "--epochs", "2"]
    out = run_here(
        [*demo, "--results-dir", str(tmp_path / "r"), *QUICK_END], tmp_path, capsys, monkeypatch
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (
        "Note: the val split has no positive of LabelYellow and no negative of LabelRed: AUROC "
        "and AP are undefined there, so val_auroc_mean and val_ap_mean are means over 1 of 3 "
        "classes." in out.stdout.splitlines()
    )
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("Demo-2-TinyConv-TinyData").experiment_id]
    )
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["val_classes_in_means"] == "1 of 3"
    assert tags["data.val.classes_without_positive"] == "LabelYellow"
    assert tags["data.val.classes_without_negative"] == "LabelRed"
    assert metrics["val_auroc_mean"] == metrics["val_auroc/LabelBlue"]
    (closing,) = [line for line in out.stdout.splitlines() if line.startswith("Best epoch")]
    assert closing.endswith(
        f"val_ap_mean {metrics['best_val_ap_mean']:.3f} [{metrics['best_val_ap_mean_ci_low']:.3f}, "
        f"{metrics['best_val_ap_mean_ci_high']:.3f}] (means over 1 of 3 classes: the rest "
        "lack a positive or a negative)"
    )


def test_every_class_in_val_says_nothing_more(mlflow_uri, tmp_path, capsys):
    config = tiny_config(tmp_path, **{"train.epochs": 1})
    result = run(config)
    assert result.classes_in_means == (3, 3)
    assert "Note: the val split" not in capsys.readouterr().out
    assert (
        MlflowClient(mlflow_uri).get_run(result.run_id).data.tags["val_classes_in_means"]
        == "3 of 3"
    )


def test_a_val_split_without_any_positive_label_is_one_line_before_any_run(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    data = gapped_tiny_folder(tmp_path / "tiny", {"e.png": (0, 0, 0), "f.png": (0, 0, 0)})
    demo = [str(REPO / "Demo-2-TinyConv-TinyData.py"), "--data-dir", str(data)]
    out = run_here([*demo, "--results-dir", str(tmp_path / "r")], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        "error: The dataset load_dataset.custom_tiny:TinyData ('val' split) has no positive "
        "label in any of its 2 samples"
    ), line
    client = MlflowClient(mlflow_uri)
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
    assert not (tmp_path / "r").exists()
