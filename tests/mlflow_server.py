"""A real `mlflow server` for the tests, started as the README's team section starts one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.postgres_server import free_port


class MlflowServer:
    """`mlflow server` on 127.0.0.1 and a free port over the store `backend_uri`, artifacts
    through it into `folder/artifacts`, its output in `folder/server.log`; `allowed_hosts`:
    the names the machines call it by (MLflow refuses a Host header that is not localhost, a
    private IP or one of these)."""

    def __init__(self, backend_uri: str, folder: Path, allowed_hosts: str = "") -> None:
        self.folder = folder
        self.artifacts = folder / "artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        mlflow = Path(sys.executable).parent / "mlflow"
        self.command = [str(mlflow), "server", "--workers", "1"]
        self.command += ["--backend-store-uri", backend_uri]
        self.command += ["--artifacts-destination", str(self.artifacts)]
        self.command += ["--host", "127.0.0.1", "--port", str(self.port)]
        if allowed_hosts:
            self.command += ["--allowed-hosts", allowed_hosts]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until it answers /health."""
        with open(self.folder / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # uvicorn's processes in a group of their own
                # No job runner (a process and seven huey consumers, ~25 s of CPU to start,
                # for GenAI jobs that training never sends).
                env={
                    **os.environ,
                    "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                },
            )
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((self.folder / "server.log").read_text()[-3000:]) from None
                time.sleep(0.2)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """The whole process group; SIGKILL (the default) when its store is thrown away."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
