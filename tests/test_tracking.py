"""src.tracking against a real SQLite MLflow store."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import src.tracking as tracking
from src.config import ExperimentConfig, RunConfig
from src.train.experiment import data_fingerprint, package_versions, resume_run, start_run
from tests.test_run_experiment import REPO


def _config(**run) -> ExperimentConfig:
    return ExperimentConfig(run=RunConfig(experiment_name="exp-a", run_name="r", **run))


def test_default_uri_is_the_repo_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tracking.REPO_ROOT / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://h:1")
    assert tracking.tracking_uri() == "http://h:1"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_start_records_config_tags_and_artifacts(mlflow_uri, tmp_path):
    tracker = start_run(_config(seed=7))
    tracker.log_epoch({"train_loss": 0.5, "val_auroc/red": 0.75, "skipped": float("nan")}, 0)
    tracker.log_epoch({"train_loss": 0.25}, 1)
    tracker.end()
    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run.seed"] == "7" and run.data.params["optimizer.lr"] == "0.001"
    assert run.data.tags["seed"] == "7"
    assert len(run.data.tags["git.commit"]) in (40, 7)  # a sha, or 'unknown' outside git
    assert run.data.tags["version.torch"]
    assert "skipped" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train_loss")] == [0, 1]
    names = {a.path for a in client.list_artifacts(tracker.run_id, "config")}
    assert names == {"config/config.toml"}
    env = {a.path for a in client.list_artifacts(tracker.run_id, "environment")}
    assert "environment/pip_freeze.txt" in env
    exp = client.get_experiment(tracker.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # artifacts live beside the store, not in the current directory
    assert exp.artifact_location.startswith((tmp_path / "store" / "mlruns").as_uri())


def test_epochs_go_to_a_local_store_in_the_background_and_its_errors_surface(mlflow_uri):
    """Epochs go through MLflow's asynchronous logging; a write that fails there is raised in
    the training thread at its next MLflow call, as one line naming the store."""
    tracker = start_run(_config())
    client = MlflowClient(mlflow_uri)
    for epoch in (1, 2, 3):
        tracker.log_epoch({"val_loss": 1.0 / epoch}, epoch)
    assert tracker.logged_steps("val_loss") == [1, 2, 3]  # a call waits for them first
    assert [m.step for m in client.get_metric_history(tracker.run_id, "val_loss")] == [1, 2, 3]
    client.delete_run(tracker.run_id)  # the store now refuses the run's writes
    tracker.log_epoch({"val_loss": 0.1}, 4)
    with pytest.raises(tracking.TrackingError, match="active"):
        tracker.log_text("x", "x.txt")
    tracker.end("FAILED")  # the error that ended the run is the one shown
    assert not tracker.sent and not tracker.holds_signals


def test_resume_refuses_changed_params(mlflow_uri):
    tracker = start_run(_config(seed=1))
    tracker.end("KILLED")
    again = resume_run(_config(seed=1), tracker.run_id)
    assert MlflowClient(mlflow_uri).get_run(tracker.run_id).info.status == "RUNNING"
    again.end()
    with pytest.raises(tracking.TrackingError, match="run.seed"):
        resume_run(_config(seed=2), tracker.run_id)
    with pytest.raises(tracking.TrackingError, match="not in the store"):
        resume_run(_config(seed=1), "0" * 32)


def test_fingerprint_changes_with_a_label():
    ds = SimpleNamespace(image_ids=["a.png", "b.png"], labels=np.array([[1, 0], [0, 1]]))
    fp = data_fingerprint(ds)
    assert fp["count"] == 2 and len(fp["fingerprint"]) == 16
    assert data_fingerprint(ds) == fp
    ds.labels = np.array([[1, 0], [1, 1]])
    assert data_fingerprint(ds)["fingerprint"] != fp["fingerprint"]
    ds.image_ids = ["b.png", "a.png"]
    assert data_fingerprint(ds)["fingerprint"] != fp["fingerprint"]


def test_server_that_does_not_answer_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port} does not answer"):
        tracking.check_server(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 60  # at once, not after minutes of retries


def test_ui_hint_names_store_and_runs_table():
    hint = tracking.ui_hint(f"sqlite:///{tracking.REPO_ROOT / 'mlflow.db'}", "3")
    assert "ui --backend-store-uri sqlite:///mlflow.db" in hint
    spaced = tracking.ui_hint("sqlite:////tmp/st öre/mlflow.db", "3")
    assert "ui --backend-store-uri 'sqlite:////tmp/st öre/mlflow.db'" in spaced
    assert "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning" in hint
    assert tracking.ui_hint("http://srv:5000", "4") == (
        "Runs: http://srv:5000/#/experiments/4/runs?workflowType=machine_learning"
    )
    assert tracking.ui_hint("http://srv:5000", "4", "abc") == (
        "Runs: http://srv:5000/#/experiments/4/runs?workflowType=machine_learning\n"
        "This run: http://srv:5000/#/experiments/4/runs/abc/model-metrics"
        "?workflowType=machine_learning"
    )


def test_git_state_counts_untracked_files_as_changes(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    monkeypatch.setattr(tracking, "REPO_ROOT", tmp_path)
    assert tracking.git_state()["dirty"] == "false"
    (tmp_path / "my_dataset.py").write_text("class MyData:\n    pass\n")
    state = tracking.git_state()
    assert state["dirty"] == "true"
    assert "+++ b/my_dataset.py\n@@ -0,0 +1,2 @@\n+class MyData:\n+    pass\n" in state["diff"]


def test_cuda_versions_are_none_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    versions = package_versions()
    assert versions["cuda"] == versions["cudnn"] == "none"
    assert versions["cuda_build"] == (torch.version.cuda or "none")


def test_a_server_gone_for_server_wait_s_stops_the_run_when_so_configured(monkeypatch):
    """`server_unreachable = "stop"`: once the server has not answered for `server_wait_s`,
    the next epoch ends the run with one line instead of training on."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    tracker = tracking.Tracker(tracking.Store(uri), "0", "run-id").configure(0.2, "stop")
    tracker.log_epoch({"val_loss": 1.0}, 1)  # queued: training does not wait
    deadline = time.monotonic() + 120
    while tracker.unreachable_s() <= 0.2 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(tracking.TrackingError) as e:
        tracker.log_epoch({"val_loss": 0.9}, 2)
    assert str(e.value).startswith(f"The MLflow server {uri} has not answered for ")
    assert "stopped (server_unreachable = 'stop')" in str(e.value) and "\n" not in str(e.value)
    tracker.sent = []  # nothing to wait for: end() only lets the signals go
    tracker.end("FAILED")


def test_an_experiment_name_cannot_leave_the_results_folder(mlflow_uri, tmp_path, capsys):
    """`--experiment-name ..` (or ../x) wrote outside the results folder and mlruns/."""
    from src.cli import main
    from tests.test_run_experiment import DEMO2

    results = tmp_path / "deep" / "results"
    args = ["--epochs", "1", "--results-dir", str(results), "--experiment-name", "../../escape"]
    assert main(args, default_config=str(DEMO2)) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["results"]
    assert [p.name for p in results.iterdir()] == ["escape"]
    exp = MlflowClient(mlflow_uri).get_experiment_by_name("../../escape")
    store = mlflow_uri[len("sqlite:///") :].rsplit("/", 1)[0]
    assert exp.artifact_location.startswith(f"file://{store}/mlruns/escape")
    assert tracking.slug("..") == "experiment" and tracking.slug("../x") == "x"


def test_a_file_system_without_locks_still_runs(mlflow_uri, tmp_path, monkeypatch):
    """Some NFS mounts refuse flock (ENOLCK): the store's and the run folder's locks are then
    skipped, not a traceback."""
    import errno
    import fcntl

    from src.run_experiment import run
    from tests.test_run_experiment import tiny_config

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setattr(tracking, "_READY_STORES", set())
    result = run(tiny_config(tmp_path, **{"train.epochs": 1}))
    assert MlflowClient(mlflow_uri).get_run(result.run_id).info.status == "FINISHED"


def test_a_search_with_a_bad_filter_is_one_line(mlflow_uri):
    """MLflow's error for a filter it cannot parse is one line naming the filter; a good filter
    finds the run."""
    tracking.start(mlflow_uri, "filters", "r", {}).end()
    finished = tracking.find_runs(mlflow_uri, "filters", "attributes.status = 'FINISHED'")
    assert [r.info.run_name for r in finished] == ["r"]
    with pytest.raises(tracking.TrackingError) as e:
        tracking.find_runs(mlflow_uri, "filters", "params.lr === 1")
    assert str(e.value).startswith("--filter 'params.lr === 1' is not a valid MLflow filter (")
    assert "\n" not in str(e.value)
    with pytest.raises(tracking.TrackingError, match=r"'0+' is not in the store .*; look again\.$"):
        tracking.get_run(mlflow_uri, "0" * 32, "look again")


KILLED_AFTER_START = """
import os, signal, sys
import src.tracking as tracking
tracking.start(sys.argv[1], "orphans", "killed", {})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_whose_process_is_gone_is_marked_failed_by_the_next_command(mlflow_uri, capsys):
    """A run left RUNNING by a process of this host that has gone (SIGKILL, or a store that
    could not take the status then) is marked FAILED by the next command on the store, which
    says so; one whose pid now belongs to a later process too; a run of a live process, or one
    left to another process, is left alone, and one of another host only named (once)."""
    # A run this process leaves RUNNING to another (a sweep's parent): no process of its own.
    tracking.start(mlflow_uri, "orphans", "handed on", {}).end("RUNNING")
    killed = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_START, mlflow_uri], cwd=REPO)
    assert killed.wait(timeout=300) == -signal.SIGKILL
    client = MlflowClient(mlflow_uri)
    experiment_id = client.get_experiment_by_name("orphans").experiment_id
    mine = tracking.holder()
    assert mine["process.pid"] == str(os.getpid()) and mine["process.host"] == socket.gethostname()
    # Runs of this process; of a process started later with the same pid; of another host.
    others = {
        "alive": {},
        "reused": {"process.started": "1.0"},
        "elsewhere": {"process.host": "n7"},
    }
    for name, tags in others.items():
        client.create_run(experiment_id, run_name=name, tags={**mine, **tags})
    capsys.readouterr()
    runs = tracking.find_runs(mlflow_uri, "orphans")  # a command that reads the runs (compare)
    ids = {r.info.run_name: r.info.run_id for r in runs}
    status = {r.info.run_name: r.info.status for r in runs}
    assert status == {
        **dict(killed="FAILED", alive="RUNNING", reused="FAILED", elsewhere="RUNNING"),
        "handed on": "RUNNING",
    }
    assert not [k for k in client.get_run(ids["handed on"]).data.tags if k.startswith("process.")]
    host, gone = socket.gethostname(), {"killed": killed.pid, "reused": os.getpid()}
    why = {
        name: f"its process {pid} on {host} ended without ending it" for name, pid in gone.items()
    }
    marked = [
        f"warning: run {ids[n]} ('{n}') was RUNNING but {why[n]}; marked FAILED." for n in gone
    ]
    named = (
        f"note: run {ids['elsewhere']} ('elsewhere') is RUNNING on host n7; only that host can "
        "tell whether its process still runs."
    )
    assert sorted(capsys.readouterr().err.splitlines()) == sorted([*marked, named])
    reason = client.get_run(ids["killed"]).data.tags["status.reason"]
    assert reason == f"{why['killed']}; marked FAILED by a later command"
    # The next run's start: nothing left to mark, the other host's run not named again.
    tracking.start(mlflow_uri, "orphans", "next", {}).end()
    assert capsys.readouterr().err == ""
    assert client.get_run(ids["alive"]).info.status == "RUNNING"


def test_a_moved_store_says_where_the_artifacts_of_its_experiments_go(
    _store_template, tmp_path, capsys
):
    """A SQLite store made in one folder, then moved with it (a moved clone): its experiment
    still names the old folder's mlruns/, where MLflow writes. A new run and a reopened run
    say so in one warning; a new experiment's artifacts lie beside the store, unsaid."""
    (tmp_path / "old").mkdir()
    shutil.copy(_store_template, tmp_path / "old" / "mlflow.db")
    first = tracking.start(f"sqlite:///{tmp_path / 'old' / 'mlflow.db'}", "moved", "a", {})
    first.end()
    assert "warning" not in capsys.readouterr().err
    shutil.move(tmp_path / "old", tmp_path / "new")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"

    second = tracking.start(uri, "moved", "b", {})
    second.end()
    reopened = tracking.reopen(uri, first.run_id)
    reopened.end()
    lines = capsys.readouterr().err.splitlines()
    old = tmp_path / "old" / "mlruns" / "moved"
    assert lines == [
        f"warning: the MLflow store {uri} was moved from {tmp_path / 'old'}: this run's "
        f"artifacts go to {old / run / 'artifacts'}, where its experiment was made. A new "
        "--experiment-name keeps them beside the store."
        for run in (second.run_id, first.run_id)
    ]
    # Artifact locations an experiment was given otherwise are not a store's: nothing said.
    for elsewhere in ("file:///artifacts", "file:///big/disk/runs/1/artifacts"):
        tracking._say_if_store_moved(uri, elsewhere)
    third = tracking.start(uri, "new-name", "c", {})
    third.end()
    assert capsys.readouterr().err == ""
    assert (
        MlflowClient(uri)
        .get_run(third.run_id)
        .info.artifact_uri.startswith((tmp_path / "new" / "mlruns").as_uri())
    )
