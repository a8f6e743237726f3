"""MLflow in the training process (src/tracking.py) over real SQLite stores: a run logs
everything, an MLflow error is one line naming the store, a run always ends with a status."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import src.tracking as tracking
from src.errors import TrackingError
from tests.test_resilience import run_in_sequence
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


def _one_error_line(done: subprocess.CompletedProcess, store: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-2000:]
    assert store in lines[0] and "Traceback" not in done.stderr


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


# A store that cannot be used -> its path, made in a folder that can be written to.
STORE_FAULTS = {
    "not a database": _not_a_database,
    "in a read-only folder": _in_a_read_only_folder,
    "read-only file": _read_only_file,
    "a folder named mlflow.db": _folder_named_like_a_store,
    "under a file": _under_a_file,
}


@pytest.mark.slow
def test_stores_that_cannot_be_used_are_one_line(tmp_path, _store_template):
    """Each: one `error:` line naming the store, exit 2; what is at the store's path left as
    it was (a file that is not a database keeps its text; no database made in a read-only
    folder). The command lines run one after another in one process of their own
    (`run_in_sequence`), the last as the process's real exit; as a user, not root."""

    def what_is_there(db: Path) -> object:
        if db.is_dir():
            return sorted(os.listdir(db))
        return db.is_file() and db.read_bytes()

    stores, commands = {}, []
    for fault, make in STORE_FAULTS.items():
        folder = tmp_path / fault.replace(" ", "-")
        (folder / "store").mkdir(parents=True)
        db = make(folder / "store", _store_template)
        stores[fault] = db, what_is_there(db)
        commands.append(_demo2(f"sqlite:///{db}", folder))
    done = run_in_sequence(commands, tmp_path / "sequence", preexec_fn=_as_a_user)
    for (fault, (db, before)), out in zip(stores.items(), done):
        try:
            _one_error_line(out, f"sqlite:///{db}")
            assert what_is_there(db) == before
        except AssertionError as e:
            raise AssertionError(f"{fault}: {e}") from None
    db, _ = stores["not a database"]
    assert db.read_text().startswith("these are my notes")
    db, _ = stores["in a read-only folder"]
    assert not db.exists()
