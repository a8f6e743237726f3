"""src.tools.reproduce: what a run records, and reproducing it on the CPU with TinyData."""

from __future__ import annotations

import csv
import importlib.metadata
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import src.tracking as tracking
from src import config as cfg
from src.run_experiment import run
from src.tools.compare_runs import MetricDiff
from src.tools.reproduce import (
    ComparisonResult,
    format_comparison,
    main,
    reproduce,
    resumed_overrides,
)
from src.train.experiment import data_fingerprint
from tests.test_run_experiment import tiny_config

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = REPO / "load_dataset" / "tiny_data"


def copy_tiny_data(tmp_path: Path) -> Path:
    target = tmp_path / "tiny_data"
    shutil.copytree(TINY_DATA, target)
    return target


def flip_first_train_label(data_dir: Path) -> str:
    """Flip LabelRed of the first (sorted) training image in tiny_labels.csv; its name."""
    name = sorted(p.name for p in (data_dir / "train").glob("*.png"))[0]
    path = data_dir / "tiny_labels.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    row = next(r for r in rows if r["Filename"] == name)
    row["LabelRed"] = "0" if row["LabelRed"].strip() in ("1", "1.0") else "1"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return name


def test_one_changed_label_changes_the_fingerprint(tmp_path):
    from load_dataset.custom_tiny import TinyData

    data_dir = copy_tiny_data(tmp_path)
    before = {s: data_fingerprint(TinyData(s, data_dir=str(data_dir))) for s in ("train", "val")}
    # The same images and labels in another folder: the same fingerprint.
    assert before["train"] == data_fingerprint(TinyData("train"))
    flip_first_train_label(data_dir)
    after = {s: data_fingerprint(TinyData(s, data_dir=str(data_dir))) for s in ("train", "val")}
    assert after["train"]["fingerprint"] != before["train"]["fingerprint"]
    assert after["train"]["count"] == before["train"]["count"]
    assert after["val"] == before["val"]


def test_a_run_records_what_reproduces_it_and_its_reproduction_is_identical_on_the_cpu(
    mlflow_uri, tmp_path, capsys
):
    """One run (3 epochs) for both: what it records, then its reproduction."""
    from load_dataset.custom_tiny import TinyData

    config = tiny_config(tmp_path)
    original = run(config)
    client = MlflowClient(mlflow_uri)
    recorded = client.get_run(original.run_id)
    tags = recorded.data.tags
    git = tracking.git_state()
    assert tags["git.commit"] == git["commit"] and tags["git.dirty"] == git["dirty"]
    assert tags["version.torch"] == importlib.metadata.version("torch")
    assert tags["version.mlflow"] == mlflow.__version__
    assert (tags["seed"], tags["deterministic"], tags["device"], tags["world_size"]) == (
        "0",
        "False",
        "cpu",
        "1",
    )
    for split, count in (("train", "150"), ("val", "50")):
        expected = data_fingerprint(TinyData(split))
        assert tags[f"data.{split}.fingerprint"] == expected["fingerprint"]
        assert tags[f"data.{split}.count"] == count == str(expected["count"])
    assert "data.test.fingerprint" not in tags  # the test split stays out unless asked for
    assert recorded.data.params == {k: str(v) for k, v in config.flat().items()}
    stored = client.download_artifacts(original.run_id, "config/config.toml", str(tmp_path))
    assert cfg.load(stored) == config
    freeze = Path(
        client.download_artifacts(original.run_id, "environment/pip_freeze.txt", str(tmp_path))
    ).read_text()
    assert f"torch=={importlib.metadata.version('torch')}" in freeze.splitlines()
    env = {a.path for a in client.list_artifacts(original.run_id, "environment")}
    assert ("environment/git_diff.patch" in env) == (git["dirty"] == "true")

    result = reproduce(original.run_id)
    assert result.identical and result.ok and result.exit_code == 0
    assert result.max_abs_diff == 0.0 and not result.missing
    assert not [w for w in result.warnings if "data" in w or "device" in w]
    keys = {d.key for d in result.diffs}
    assert {"train_loss", "val_loss", "val_auroc_mean", "val_ap/LabelRed", "best_val_loss"} <= keys
    assert not keys & {"train_images_per_s", "data_wait_fraction"}
    assert sorted(d.step for d in result.diffs if d.key == "val_loss") == [1, 2, 3]

    new, old = client.get_run(result.new_run_id), client.get_run(original.run_id)
    assert new.info.run_id != old.info.run_id
    assert new.info.experiment_id == old.info.experiment_id
    assert new.data.tags["reproduces"] == original.run_id
    assert new.info.run_name == f"{old.info.run_name}-reproduce"
    changed = {k for k in old.data.params if old.data.params[k] != new.data.params.get(k)}
    assert changed == {"run.run_name"}
    text = format_comparison(result)
    assert "IDENTICAL" in text and "Largest absolute difference: 0" in text


def test_changed_data_is_named_before_the_reproduction_trains_then_all_changes_fail_loudly(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """One original run (2 epochs) for both: a reproduction stopped as it would start training,
    then one that trains."""
    import src.run_experiment

    data_dir = copy_tiny_data(tmp_path)
    config = tiny_config(tmp_path, **{"data.args.data_dir": str(data_dir), "train.epochs": 2})
    original = run(config)
    client = MlflowClient(mlflow_uri)
    flip_first_train_label(data_dir)

    # The changed data is named before the reproduction trains (here it is stopped there).
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as stopped:
        stopped.setattr(src.run_experiment, "run", interrupted)
        capsys.readouterr()
        assert main([original.run_id]) == 130
    err = capsys.readouterr().err
    assert "warning: the train data differ from the original run's" in err
    assert "the val data differ" not in err

    # Since the original: a commit (simulated by its tag), one flipped training label, and a
    # deliberately changed learning rate. Each is named; the metrics differ: exit code 1.
    client.set_tag(original.run_id, "git.commit", "0" * 40)
    assert main([original.run_id, "--set", "optimizer.lr=0.01"]) == 1
    out, err = capsys.readouterr()
    assert "DIFFERENT" in out and "IDENTICAL" not in out
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, err
    assert "changes the original config: optimizer.lr = 0.01" in warnings[0]
    assert "made at commit 000000000000" in warnings[1]
    assert "the train data differ" in warnings[2] and "fingerprint" in warnings[2]
    (reproduction,) = client.search_runs(
        [original.experiment_id], f"tags.reproduces = '{original.run_id}'"
    )
    assert reproduction.data.params["optimizer.lr"] == "0.01"
    val_fingerprint = client.get_run(original.run_id).data.tags["data.val.fingerprint"]
    assert reproduction.data.tags["data.val.fingerprint"] == val_fingerprint


def test_tolerance_decides_the_exit_code():
    diffs = [
        MetricDiff("val_loss", 0, 0.5, 0.5),
        MetricDiff("val_loss", 1, 0.25, 0.25 + 2**-20),
    ]
    strict = ComparisonResult("a", "b", diffs)
    assert not strict.identical and strict.exit_code == 1
    assert strict.max_abs_diff == 2**-20 and strict.worst == diffs[1]
    loose = ComparisonResult("a", "b", diffs, tolerance=1e-6)
    assert loose.ok and not loose.identical and loose.exit_code == 0
    assert "within the tolerance 1e-06" in format_comparison(loose)
    # A value only one run logged is never within any tolerance.
    gap = ComparisonResult("a", "b", [*diffs, MetricDiff("val_loss", 2, 0.2, None)], 1e9)
    assert gap.max_abs_diff == float("inf") and gap.exit_code == 1
    assert "missing in the reproduction" in format_comparison(gap)
    # Nothing compared proves nothing.
    assert ComparisonResult("a", "b", []).exit_code == 1


def test_a_resume_that_trained_longer_is_reproduced_with_its_final_epochs():
    tags = {"resumed.train.epochs": "30", "resumed.train.patience": "5", "seed": "0"}
    assert resumed_overrides(tags) == {"train.epochs": 30, "train.patience": 5}
    assert resumed_overrides({"seed": "0"}) == {}


def test_unknown_run_or_store_is_one_line_and_exit_2(mlflow_uri, tmp_path, capsys):
    assert main(["0" * 32]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MLflow run '000") and "\n" not in err
    missing = tmp_path / "nowhere" / "mlflow.db"
    assert main(["0" * 32, "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    with pytest.raises(SystemExit):
        main([])
