"""A TinyData run logging to a real `mlflow server` on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import shutil
import socket
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from benchmarks.postgres_server import free_port
from src.run_experiment import run
from tests.mlflow_server import MlflowServer
from tests.test_run_experiment import tiny_config

pytestmark = pytest.mark.slow  # Demos, torchrun or an MLflow server in their own processes


class Link:
    """The network between the client and a server: a TCP relay on its own port. `cut()`
    drops every connection and refuses new ones (what a client sees of a server that died
    or a network that went down); `mend()` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.open = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.mend()

    def mend(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.open.set()
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        self.open.clear()
        with self.lock:
            for s in self.sockets:
                _close(s)
            self.sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        with listener:
            while self.open.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target))
                except OSError:
                    _close(client)
                    continue
                with self.lock:  # a connection accepted as the link was cut is cut too
                    if not self.open.is_set():
                        _close(client)
                        _close(upstream)
                        break
                    self.sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=_relay, args=(a, b), daemon=True).start()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def server(_store_template: Path, tmp_path: Path):
    """A real `mlflow server` over a copy of the session's empty store."""
    shutil.copy(_store_template, tmp_path / "server.db")
    s = MlflowServer(f"sqlite:///{tmp_path / 'server.db'}", tmp_path)
    s.start()
    try:
        yield s
    finally:
        s.stop()  # its store is thrown away: no need to wait for a clean stop


def test_run_logs_to_a_server_reads_back_and_survives_its_outage(
    server, tmp_path, monkeypatch, capsys
):
    """Then the server goes out of reach mid-run and comes back:
    `check_a_dead_server_does_not_stop_training` (one server start for both: it takes 10-25 s)."""
    mlflow_server = server.uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run(tiny_config(tmp_path, **{"train.epochs": 1, "run.tracking_uri": mlflow_server}))
    client = MlflowClient(mlflow_server)
    r = client.get_run(result.run_id)
    assert r.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_auroc_mean")] == [1]
    local = client.download_artifacts(result.run_id, "config/config.toml", str(tmp_path))
    assert 'experiment_name = "tiny-test"' in Path(local).read_text()
    paths = {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert paths == {"checkpoint/best.pt"}  # run.log_model = false: the weights as they are
    assert (tmp_path / "artifacts").is_dir()  # the server stored them, not the client's cwd
    check_a_dead_server_does_not_stop_training(server, tmp_path, capsys, monkeypatch)


def check_a_dead_server_does_not_stop_training(
    server: MlflowServer, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The server goes out of reach after epoch 2 (every connection dropped, new ones refused:
    what the client sees of a server killed with SIGKILL, without 10-25 s of starting another)
    and comes back a while later: training does not wait for it (a dead server stalled it for
    497 s, then a traceback, the run left RUNNING), says once that the server does not answer,
    and every epoch reaches the server (the run's end waits for it)."""
    results = tmp_path / "outage"
    link = Link(server.port)
    # The client's own retries (a few seconds, src/tracking.py) off: the first refused request
    # fails at once, and the run.s own handling (the Tracker, src/tracking.py) bridges the outage.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = tiny_config(
        tmp_path,
        **{
            "train.epochs": 5,
            "run.tracking_uri": link.uri,
            "run.results_dir": str(results),
            "run.experiment_name": "outage",
            "run.server_wait_s": 0.5,
            "data.dataset": "tests.faulty_data:SlowTinyData",
            "data.args.delay_s": 0.005,  # about 1 s an epoch
        },
    )

    def outage(epoch: int, metrics: dict) -> bool:
        """Cut after epoch 2, mended after epoch 4: epochs 3 and 4 (each > server_wait_s) are
        sent to no server, however slow the machine; the run says so once, and trains on."""
        if epoch == 2:
            link.cut()
        elif epoch == 4:
            link.mend()
        return False

    result = run(config, on_epoch=outage)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: The MLflow server")]
    assert len(warnings) == 1 and "training goes on" in warnings[0], err
    client = MlflowClient(server.uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(result.run_id, "val_loss")]
    assert steps == list(range(1, 6))
