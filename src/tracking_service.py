"""MLflow in a process of its own, so the training process never imports it.

Importing MLflow and opening a SQLite store take seconds (MLflow's modules, SQLAlchemy, the
store's checks); the training process spends the same seconds importing torch. `start()`, called
by the command line once the config is read and before torch is imported, starts
`python -m src.tracking_service`, which imports MLflow and opens the store while torch loads;
`client(uri)` then gives the training process an object with the MlflowClient methods the
tracker uses, each a request over a pipe. Requests and replies are plain data (pickled tuples,
strings, numbers), never MLflow objects: unpickling one would import MLflow after all.

The service ignores Ctrl-C and SIGTERM (the training process decides how a run ends and tells
it) and ends when its pipe closes: when the run is done (`stop()`), or when the training
process ends, however it ends. It then exits at once: every request has been answered.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Any

from src.errors import TrackingError

_SERVICE: Service | None = None


class Service:
    """The service process and the pipe to it; one request at a time."""

    def __init__(self, uri: str, prepare_model: bool = False) -> None:
        from src.config import REPO_ROOT

        self.uri = uri
        # In the caller's folder (relative paths mean the same), with the repository importable.
        path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "src.tracking_service", uri, str(int(prepare_model))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": path},
        )
        self.lock = threading.Lock()
        self.sent = self.read = 0  # requests written, replies read (they come in order)
        self.replies: dict[int, tuple] = {}  # replies read but not yet asked for

    def submit(self, op: str, *args: Any, **kwargs: Any) -> int:
        """Send a request without waiting; its number, for `result`."""
        with self.lock:
            self._pipe(lambda: pickle.dump((op, args, kwargs), self.proc.stdin))
            self._pipe(self.proc.stdin.flush)
            self.sent += 1
            return self.sent

    def result(self, number: int) -> Any:
        """The reply of request `number` (replies come in order), or its error raised."""
        with self.lock:
            while number not in self.replies:
                self.read += 1
                self.replies[self.read] = self._pipe(lambda: pickle.load(self.proc.stdout))
            reply = self.replies.pop(number)
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        raise TrackingError(f"MLflow: {kind}: {message}")

    def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return self.result(self.submit(op, *args, **kwargs))

    def _pipe(self, io: Any) -> Any:
        """One read or write of the pipe. In the main thread, Ctrl-C and SIGTERM wait for it
        (src/interrupts.py): a message cut in half would garble every later one, and the run
        could not then be marked KILLED."""
        from src import interrupts

        main = threading.current_thread() is threading.main_thread()
        try:
            with interrupts.mlflow_call(interruptible=False) if main else nullcontext():
                return io()
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            raise TrackingError(
                f"The MLflow tracking process ended (exit code {self.proc.poll()}): {e}"
            ) from None


def start(uri: str, prepare_model: bool = False) -> None:
    """Start the service for `uri` unless MLflow is imported here already (then it gains
    nothing) or this is not rank 0 of a distributed launch. `prepare_model`: the run will log
    an MLflow model; the service makes ready what that needs before the run's end."""
    global _SERVICE
    if _SERVICE is not None or "mlflow" in sys.modules or os.environ.get("RANK", "0") != "0":
        return
    _SERVICE = Service(uri, prepare_model)  # it opens the store as it starts


def stop() -> None:
    """Let the service end (it exits when its pipe closes) once the run no longer needs it:
    meanwhile this process prints its report and exits."""
    global _SERVICE
    if _SERVICE is not None:
        try:
            _SERVICE.proc.stdin.close()
        except OSError:  # it ended already
            pass
        _SERVICE = None


def of(tracker: Any) -> Service | None:
    """The service a tracker's client talks to, if any."""
    client = getattr(tracker, "client", None)
    return client.service if isinstance(client, ServiceClient) else None


def client(uri: str) -> Any | None:
    """A client over the service for `uri`, or None (use MLflow here)."""
    if _SERVICE is None or _SERVICE.uri != uri or "mlflow" in sys.modules:
        return None
    return ServiceClient(_SERVICE)


class ServiceClient:
    """The MlflowClient methods the tracker uses, answered by the service."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def get_experiment_by_name(self, name: str) -> Any:
        found = self.service.call("get_experiment_by_name", name)
        return None if found is None else SimpleNamespace(**found)

    def create_experiment(self, name: str, artifact_location=None, tags=None) -> str:
        return self.service.call("create_experiment", name, artifact_location, tags)

    def create_run(self, experiment_id: str, run_name=None, tags=None) -> Any:
        run_id = self.service.call("create_run", experiment_id, run_name, tags)
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id))

    def log_tuples(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """MlflowClient.log_batch with (key, value, timestamp, step) and (key, value) tuples."""
        self.service.call("log_batch", run_id, list(metrics), list(params), list(tags))

    def ended(self) -> bool:
        """Whether the tracking process is gone."""
        return self.service.proc.poll() is not None

    def log_artifact(self, run_id: str, local_path: str, artifact_path=None) -> None:
        self.service.call("log_artifact", run_id, local_path, artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.service.call("log_text", run_id, text, artifact_file)

    def get_metric_history(self, run_id: str, key: str) -> list[Any]:
        return [SimpleNamespace(step=s) for s in self.service.call("metric_steps", run_id, key)]

    def set_terminated(self, run_id: str, status: str = "FINISHED") -> None:
        self.service.call("set_terminated", run_id, status)


# ------------------------------------------------------------------ the service process


def _requirements_map() -> None:
    try:
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map
    except ImportError:  # a later MLflow: it makes its own when the model is logged
        return
    _init_packages_to_modules_map()


def _serve(uri: str, prepare_model: bool) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from mlflow.entities import Metric, Param, RunTag

    from src import tracking
    from src.errors import one_line

    mlflow_client = tracking._client(uri)  # imports MLflow and opens the store, now
    # MLflow checks a logged model's pip requirements against the installed packages, from a
    # map of every installed distribution to its modules: seconds with CUDA's wheels. Made
    # now, while the training process sets up (one core), not when the run's end waits for
    # it. Not the model's imports (torch, MLflow's pyfunc): made during training, they slowed
    # epochs whose torch threads use every core by more than they saved at the end.
    preparing = threading.Thread(target=_requirements_map if prepare_model else None, daemon=True)
    preparing.start()

    def log_model(classifier_args, best_path, run_id, step, code_from, register_as):
        preparing.join()
        import src.serve.model_package as mp

        classifier = mp.ImageClassifier(*classifier_args)
        info = mp.log_model(classifier, best_path, uri, run_id, step, code_from, register_as)
        return getattr(info, "registered_model_version", None)

    def get_experiment_by_name(name: str) -> dict | None:
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            return None
        return {"experiment_id": exp.experiment_id, "lifecycle_stage": exp.lifecycle_stage}

    def log_batch(run_id, metrics, params, tags) -> None:
        mlflow_client.log_batch(
            run_id,
            metrics=[Metric(*m) for m in metrics],
            params=[Param(*p) for p in params],
            tags=[RunTag(*t) for t in tags],
        )

    def metric_steps(run_id: str, key: str) -> list[int]:
        return [m.step for m in mlflow_client.get_metric_history(run_id, key)]

    def create_run(experiment_id, run_name, tags) -> str:
        return mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    handlers = {
        "get_experiment_by_name": get_experiment_by_name,
        "create_experiment": lambda name, location, tags: mlflow_client.create_experiment(
            name, artifact_location=location, tags=tags
        ),
        "create_run": create_run,
        "log_batch": log_batch,
        "log_artifact": lambda run_id, path, where: mlflow_client.log_artifact(
            run_id, path, artifact_path=where
        ),
        "log_text": lambda run_id, text, name: mlflow_client.log_text(run_id, text, name),
        "metric_steps": metric_steps,
        "log_model": log_model,
        "set_terminated": lambda run_id, status: mlflow_client.set_terminated(
            run_id, status=status
        ),
    }
    read, write = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # MLflow's prints must not reach the pipe
    while True:
        try:
            op, args, kwargs = pickle.load(read)
        except EOFError:  # every request was answered: nothing is left to write or close
            sys.stderr.flush()
            os._exit(0)  # not Python's teardown of MLflow's and torch's modules (a second)
        try:
            reply: tuple = ("ok", handlers[op](*args, **kwargs))
        except Exception as e:
            reply = ("error", type(e).__name__, one_line(e))
        pickle.dump(reply, write)
        write.flush()


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2:3] == ["1"])
