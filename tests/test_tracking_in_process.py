"""MLflow in the training process (src/tracking.py) over real SQLite stores: a run logs
everything, an MLflow error is one line naming the store, a run always ends with a status."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import src.tracking as tracking
from src.errors import TrackingError
from tests.test_run_experiment import DEMO2, REPO


def test_a_run_through_tracking_logs_everything_and_always_ends_with_a_status(mlflow_uri, tmp_path):
    """Params, tags, epochs, texts and files arrive; an MLflow error (a param logged again with
    another value) is one line naming the store; the run then ends FAILED, not RUNNING."""
    tracker = tracking.start(mlflow_uri, "in-process", "r", {"seed": 0}, {"optimizer.lr": 0.1})
    try:
        tracker.log_epoch({"val_loss": 0.5}, 1)
        tracker.log_epoch({"val_loss": 0.25, "skipped": float("nan")}, 2)
        tracker.log_text("hello", "notes/hello.txt")
        (tmp_path / "table.csv").write_text("a\n1\n")
        tracker.log_artifact(tmp_path / "table.csv", "tables")
        assert tracker.logged_steps("val_loss") == [1, 2]
        with pytest.raises(TrackingError) as error:
            tracker.log_params({"optimizer.lr": 0.2})  # params are immutable
        message = str(error.value)
        assert message.startswith(f"The MLflow store {mlflow_uri} cannot be used: ")
        assert "\n" not in message
    finally:
        tracker.end("FAILED")
    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"optimizer.lr": "0.1"} and run.data.tags["seed"] == "0"
    history = client.get_metric_history(tracker.run_id, "val_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25)]
    assert "skipped" not in run.data.metrics
    names = {a.path for a in client.list_artifacts(tracker.run_id, "notes")}
    names |= {a.path for a in client.list_artifacts(tracker.run_id, "tables")}
    assert names == {"notes/hello.txt", "tables/table.csv"}
    assert not tracker.holds_signals


def _demo2(uri: str, folder: Path) -> tuple[list[str], dict[str, str], Path]:
    """Demo-2's command line for one quick epoch with the store `uri` and results in `folder`:
    (argv, environment, working folder) for `run_in_sequence`."""
    argv = ["-m", "src.run_experiment", str(DEMO2), "--epochs", "1", "--max-batches", "1"]
    argv += ["--results-dir", str(folder / "results"), "--set", "run.log_model=false"]
    env = {"MLFLOW_TRACKING_URI": uri, "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(folder)}
    return argv, env, REPO


def _as_a_user() -> None:
    """In the child, before it runs: root loses its power to write any file whatever its mode
    (CAP_DAC_OVERRIDE, dropped from the capabilities a program it starts can have)."""
    if os.geteuid() == 0:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        assert prctl(24, 1, 0, 0, 0) == 0  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE


def _not_a_database(folder: Path, template: Path) -> Path:
    db = folder / "notes.db"
    db.write_text("these are my notes, not a database\n" * 100)
    return db


def _in_a_read_only_folder(folder: Path, template: Path) -> Path:
    """A new store in a folder the user cannot write to; no database may be made there. (root
    writes to any folder of mode 555: it gets /proc, where the kernel makes no file for
    anyone.)"""
    read_only = folder / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:
        read_only = Path("/proc/self")
    return read_only / "mlflow.db"


def _read_only_file(folder: Path, template: Path) -> Path:
    db = folder / "mlflow.db"
    shutil.copy(template, db)
    db.chmod(0o444)
    return db


def _folder_named_like_a_store(folder: Path, template: Path) -> Path:
    (folder / "mlflow.db").mkdir()
    return folder / "mlflow.db"


def _under_a_file(folder: Path, template: Path) -> Path:
    (folder / "notes").write_text("my notes")
    return folder / "notes" / "mlflow.db"


# A store that cannot be used -> its path, made in a folder that can be written to. Demo-2's
# command line on each (`_demo2`) is one `error:` line naming the store, exit code 2, and
# leaves what is at the store's path as it was: test_bad_input_in_a_real_process
# (test_resilience.py) runs them in a process of its own, with the Demo's other bad input.
STORE_FAULTS = {
    "not a database": _not_a_database,
    "in a read-only folder": _in_a_read_only_folder,
    "read-only file": _read_only_file,
    "a folder named mlflow.db": _folder_named_like_a_store,
    "under a file": _under_a_file,
}
