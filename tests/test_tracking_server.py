"""A TinyData run logging to a real `mlflow server` on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from src.run_experiment import run
from tests.test_run_experiment import tiny_config

pytestmark = pytest.mark.slow  # Demos, torchrun or an MLflow server in their own processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(_store_template: Path, tmp_path: Path):
    db = tmp_path / "server.db"
    shutil.copy(_store_template, db)
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
                time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # uvicorn workers, job runner, huey consumer too
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_run_logs_to_a_server_and_reads_back(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run(tiny_config(tmp_path, **{"train.epochs": 2, "run.tracking_uri": mlflow_server}))
    client = MlflowClient(mlflow_server)
    r = client.get_run(result.run_id)
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_auroc_mean")] == [1, 2]
    local = client.download_artifacts(result.run_id, "config/config.toml", str(tmp_path))
    assert 'experiment_name = "tiny-test"' in Path(local).read_text()
    paths = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert paths == {"model/best.pt"}
    assert (tmp_path / "artifacts").is_dir()  # the server stored them, not the client's cwd
