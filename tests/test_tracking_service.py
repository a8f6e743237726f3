"""src/tracking_service.py: MLflow in a process of its own, over a real SQLite store."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from src import tracking, tracking_service
from src.errors import TrackingError


def test_a_run_through_the_tracking_process_and_its_death(mlflow_uri):
    """What the training process sends arrives; an MLflow error comes back as one line; when
    the process dies, the next call says so in one line and the run still ends with a status
    (written from this process), not RUNNING."""
    service = tracking_service.Service(mlflow_uri)
    client = tracking_service.ServiceClient(service)
    experiment = tracking.get_or_create_experiment(client, mlflow_uri, "service")
    run_id = client.create_run(experiment, run_name="r", tags={"seed": "0"}).info.run_id
    tracker = tracking.Tracker(client, mlflow_uri, experiment, run_id)
    try:
        tracker.log_params({"optimizer.lr": 0.1})
        tracker.log_epoch({"val_loss": 0.5}, 1)
        assert tracker.logged_steps("val_loss") == [1]
        with pytest.raises(TrackingError) as error:
            client.set_terminated("0" * 32)  # no such run
        assert error.value.args[0].startswith("MLflow: ") and "\n" not in error.value.args[0]
        service.proc.kill()
        service.proc.wait()
        with pytest.raises(TrackingError, match="The MLflow tracking process ended"):
            tracker.log_params({"optimizer.momentum": 0.9})
    finally:
        tracker.end("FAILED")
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.params == {"optimizer.lr": "0.1"}
    assert run.data.tags["seed"] == "0"
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


def test_no_tracking_process_where_mlflow_is_imported_already(mlflow_uri, monkeypatch):
    """In a process that has MLflow (a notebook, these tests) it would only cost a second
    import: the client stays MLflow's own."""
    monkeypatch.setattr(tracking_service, "_SERVICE", None)
    tracking_service.start(mlflow_uri)
    assert tracking_service._SERVICE is None
    assert tracking_service.client(mlflow_uri) is None
