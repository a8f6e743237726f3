"""The one door to MLflow's tracking API: where runs go, a run's records, reading runs back.

The tracking URI is the one given (a config's `run.tracking_uri`), else `MLFLOW_TRACKING_URI`,
else `sqlite:///<repo>/mlflow.db` with artifacts under `<repo>/mlruns`, so `mlflow ui` started
in the repository root shows every run. This module takes plain values (URIs, names, dicts,
texts) and knows nothing of training, models or datasets. A `Tracker` is one run; it holds
Ctrl-C and SIGTERM until the run ends (src/interrupts.py): a signal is never lost and never
cuts an MLflow write in half. An MLflow error a user meets is one line naming the store.
A run's tags name the process that holds it (`holder`): the next run started on the store, or
a search of its runs, marks FAILED a run left RUNNING by a process of this host that has gone
(SIGKILL; a store that could not take the status then), and says so (`end_orphans`).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import importlib.metadata
import json
import logging
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any
from unittest import mock

import mlflow.store.db.utils as mlflow_db
import psutil
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.models import Model
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.utils import get_results_from_paginated_fn
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

import src.interrupts as interrupts
from src.errors import TrackingError, one_line

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URI = f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
# The UI's query that opens a page in its model-training views, not its GenAI ones.
ML_VIEWS = "workflowType=machine_learning"
END_WAIT_S = 60.0  # how long a run at its end waits for a tracking server to come back
RETRY_S = 2.0  # between two tries of metrics a tracking server refused
# Seconds between two samples of the machine's system metrics (CPU, memory, GPU); MLflow's
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, takes precedence.
SYSTEM_METRICS_S = 10.0
SYSTEM_METRICS_STOP_S = 5.0  # how long a run's end waits for the last sample to be logged


def tracking_uri(configured: str = "") -> str:
    """`configured` (a config's run.tracking_uri), else MLFLOW_TRACKING_URI, else the
    repository's SQLite store."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, in one sentence, when an http(s) tracking server does not answer.

    The MLflow client would otherwise retry for minutes before the first metric is logged.
    """
    if not _remote(uri):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s).close()
    except OSError as e:  # urllib's URLError and HTTPError included
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"The MLflow tracking server {uri} does not answer ({reason}); start it "
            "(see README.md, 'A team MLflow server') or pass another --tracking-uri."
        ) from None


def _sqlite_dir(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else None


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store, the link to the runs table and,
    given `run_id`, to that run's own page (its Model metrics tab, the curves)."""
    local = _sqlite_dir(uri) is not None
    base = f"{'http://127.0.0.1:5000' if local else uri.rstrip('/')}/#/experiments/{experiment_id}"
    runs = f"{base}/runs?{ML_VIEWS}"
    if run_id:
        runs += f"\nThis run: {base}/runs/{run_id}/model-metrics?{ML_VIEWS}"
    if not local:
        return f"Runs: {runs}"
    shown = os.path.relpath(uri[len("sqlite:///") :], REPO_ROOT)
    store = uri if shown.startswith("..") else f"sqlite:///{shown}"
    mlflow_bin = os.path.relpath(Path(sys.executable).parent / "mlflow", REPO_ROOT)
    mlflow_bin = "mlflow" if mlflow_bin.startswith("..") else mlflow_bin
    # Quoted, so that a path with a space or a quote pastes into a shell as it is.
    command = f"{shlex.quote(mlflow_bin)} ui --backend-store-uri {shlex.quote(store)}"
    opens = f"Open the MLflow UI (from {shlex.quote(str(REPO_ROOT))}): {command}"
    return f"{opens}\nthen {runs}"


def slug(name: str) -> str:
    """`name` as one folder name: runs of other characters become one '-', and leading and
    trailing dots and dashes go ('..' or '../x' never leave the folder they are put in)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "experiment"


# ------------------------------------------------------------------ where a run came from


def git_state() -> dict[str, str]:
    """Commit, dirty flag and diff of the repository ('unknown' outside a git checkout)."""

    def git(*args: str, check: bool = True) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=check
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        diff = git("diff", "HEAD")
        # Untracked files count: a new dataset or model module not yet added changes the run.
        # git shows each as added; one over 1 MB as binary ("Binary files ... differ").
        for path in git("ls-files", "--others", "--exclude-standard", "-z").split("\0"):
            if path:  # `diff --no-index` exits with 1 when the files differ
                limit = ["-c", "core.bigFileThreshold=1m"]
                diff += git(*limit, "diff", "--no-index", "--", "/dev/null", path, check=False)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": "unknown", "diff": ""}
    return {"commit": commit, "dirty": str(bool(diff)).lower(), "diff": diff}


def pip_freeze() -> str:
    dists = {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()}
    return "\n".join(sorted((d for d in dists if not d.startswith("None")), key=str.lower)) + "\n"


# ------------------------------------------------------------------ the store


class Store:
    """The MLflow store `uri` as an `MlflowClient`: the same methods and arguments, each call
    waited for by a signal (src/interrupts.py) and failing with one line naming the store.

    HTTP retries are short; a SQLite store's folder and tables are made once, one process at
    a time."""

    run_id = ""  # the run (`Tracker`) whose records go through it: its errors name that run

    def __init__(self, uri: str) -> None:
        self.uri = uri
        # MLflow logs each failed database session with its traceback; the error is one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        if _remote(uri):
            # MLflow retries a request 7 times with a doubling back-off (minutes in all) before
            # it fails: a few seconds, then the run's own handling (`Tracker`) takes over.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        sqlite_dir = _sqlite_dir(uri)
        if sqlite_dir is None or uri in _READY_STORES:
            self.client = MlflowClient(tracking_uri=uri)
            return
        # MLflow creates a new SQLite store's tables on first use; runs that start together (a
        # job array) would each create them and all but one crash ("table ... already exists").
        with self.errors():
            sqlite_dir.mkdir(parents=True, exist_ok=True)
            with open(sqlite_dir / f"{Path(uri).name}.lock", "a") as lock:
                with suppress(OSError):  # a file system without locks (some NFS): go unguarded
                    fcntl.flock(lock, fcntl.LOCK_EX)
                # MLflow tries 10 times in ~100 s to open a database; a file that cannot be one
                # (a folder, not a database, out of reach) will not become one meanwhile.
                with mock.patch.object(mlflow_db, "MAX_RETRY_COUNT", 1):
                    self.client = MlflowClient(tracking_uri=uri)
                    self.client.search_experiments(max_results=1)
        _READY_STORES.add(uri)

    @contextmanager
    def errors(self, interruptible: bool = True, explain: Callable | None = None) -> Iterator[None]:
        """MLflow calls a signal waits for (`interruptible`: raised before or after them);
        their error is one line naming the store, or `explain(error)` where that is a line."""
        with interrupts.mlflow_call(interruptible):
            try:
                yield
            except Exception as e:
                line = explain(e) if explain else None
                error = TrackingError(line) if line else _store_error(self.uri, e, self.run_id)
                raise error from None

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("_") or name == "client":  # not an MLflow call (copy, pickle)
            raise AttributeError(name)
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self.errors():
                return method(*args, **kwargs)

        return call


_READY_STORES: set[str] = set()


def _store_error(uri: str, e: BaseException, run_id: str = "") -> TrackingError:
    """`e` of the store `uri` as one line; `run_id`: it stopped that run (which resumes)."""
    # MLflow's error wraps SQLAlchemy's, which wraps the database driver's: that one, no SQL.
    reason = one_line(getattr(e.__cause__, "orig", None) or getattr(e, "orig", None) or e)
    if _remote(uri):
        return TrackingError(
            f"The MLflow server {uri} failed: {reason}; resume with --resume once it answers again."
        )
    if run_id:
        return TrackingError(
            f"The MLflow store {uri} cannot be used: {reason}; run {run_id} stopped (the store "
            "needs room on its disk and write access)."
        )
    return TrackingError(
        f"The MLflow store {uri} cannot be used: {reason}; it needs a folder and a file you "
        "can write to, the file an MLflow database (or none yet): pass another "
        "--tracking-uri (or MLFLOW_TRACKING_URI)."
    )


def existing_store(uri: str | None = None) -> str:
    """`uri` (default: as for training) for the commands that read runs: a SQLite store that
    is not there is refused (MLflow would create an empty one), a server must answer."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise TrackingError(
            f"The MLflow store {uri} does not exist; run an experiment first or pass "
            "--tracking-uri."
        )
    check_server(uri)
    return uri


# ------------------------------------------------------------------ reading runs


def get_run(uri: str, run_id: str, what_to_do: str = "") -> Any:
    """The MLflow run `run_id` (`.info`, `.data.params/.tags/.metrics`), or one line naming
    the store and `what_to_do`."""
    what_to_do = what_to_do or (
        "copy the run id from the MLflow UI or from `python -m src.tools.compare_runs`, "
        "or pass --tracking-uri"
    )
    not_there = f"MLflow run {run_id!r} is not in the store {uri}; {what_to_do}."
    store = Store(uri)
    with store.errors(explain=lambda e: not_there):  # MLflow's error for an unknown or bad id
        return store.client.get_run(run_id)


def find_runs(
    uri: str, experiment: str, filter_string: str = "", newest_first: bool = False, limit=None
) -> list[Any]:
    """The active runs of the experiment named `experiment` that match MLflow's search
    `filter_string`, oldest first (newest first), at most `limit`."""
    store = Store(uri)
    found = store.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in store.search_experiments())
        raise TrackingError(
            f"There is no MLflow experiment named {experiment!r} in {uri}; the experiments "
            f"there are: {', '.join(names) or 'none'}."
        )
    return _search(store, found.experiment_id, filter_string, newest_first, limit)


def child_runs(
    uri: str, parent_run_id: str, filter_string: str = "", newest_first=False, limit=None
):
    """The runs whose parent is `parent_run_id` (and match `filter_string`)."""
    parent = get_run(uri, parent_run_id)
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    where += f" and {filter_string}" if filter_string else ""
    return _search(Store(uri), parent.info.experiment_id, where, newest_first, limit)


def _search(store: Store, experiment_id, filter_string, newest_first, limit) -> list[Any]:
    with suppress(TrackingError):  # first the runs a gone process left RUNNING (unless read-only)
        end_orphans(store, experiment_id)
    order = [f"attributes.start_time {'DESC' if newest_first else 'ASC'}"]

    def page(max_results: int, token: str | None) -> Any:
        return store.client.search_runs(
            [experiment_id], filter_string, order_by=order, max_results=max_results,
            page_token=token,
        )  # fmt: skip

    def invalid_filter(e: Exception) -> str | None:
        if getattr(e, "error_code", "") != "INVALID_PARAMETER_VALUE":
            return None  # the store's own error
        first = str(e.message).strip().splitlines()[0]
        return (
            f"--filter {filter_string!r} is not a valid MLflow filter ({first}); write e.g. "
            "\"params.optimizer.lr = '0.01'\"."
        )

    with store.errors(explain=invalid_filter):
        return get_results_from_paginated_fn(page, 1000, limit)


@contextmanager
def quiet() -> Iterator[None]:
    """MLflow's notes while it logs or loads a model (the CloudPickle caution, the check of the
    input example) and its download bars left out of the output; its errors still show."""
    loggers = [logging.getLogger(name) for name in ("mlflow.pyfunc", "mlflow.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with mock.patch.dict(os.environ, {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for the block (`Model.log` and loading a
    `runs:/` or `models:/` URI read only that), then put back as it was, MLFLOW_TRACKING_URI
    included (MLflow's own `_use_tracking_uri` deletes that variable when no URI was set)."""
    with mock.patch.dict(os.environ), _use_tracking_uri(uri):
        yield


# ------------------------------------------------------------------ one run


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""
    experiment_id = ""
    uri = ""

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None: ...
    def log_datasets(self, datasets: list[dict[str, Any]]) -> None: ...
    def watch_system(self, resumed: bool = False) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_model(
        self, name: str, step: int, register_as: str = "", alias: str = "", **model: Any
    ) -> Any: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def logged_steps(self, key: str) -> list[int]:
        return []


class Tracker(NullTracker):
    """One MLflow run, driven through `MlflowClient` (no global 'active run' state).

    Epochs' metrics go through MLflow's asynchronous logging: training does not wait for the
    store. MLflow drops a batch its store refused (it only logs an error), so the tracker keeps
    each batch until the store has taken it, and sends a refused one again: a tracking server
    that is down or hangs never stops training. When it has not answered for `server_wait_s`,
    the run says so once and trains on, or stops with a one-line error when
    `server_unreachable = "stop"`; any other call, and the run's end, first waits up to
    `END_WAIT_S` for it. What is not sent is in last.pt: a resumed run logs it.
    """

    def __init__(self, store: Store, experiment_id: str, run_id: str) -> None:
        self.store, self.uri = store, store.uri
        store.run_id = run_id
        self.experiment_id, self.run_id = experiment_id, run_id
        # MLflow's async queue logs each refused batch as an error; the run says so itself, once.
        logging.getLogger("mlflow.utils.async_logging.async_logging_queue").setLevel(
            logging.CRITICAL
        )
        self.signals = ExitStack()
        self.holds_signals = self.signals.enter_context(interrupts.held())
        self.server_wait_s, self.server_unreachable = 60.0, "continue"
        self.sent: list[tuple[float, list[Metric], list]] = []  # (sent at, batch, its futures)
        self.failing_since: float | None = None  # time.monotonic() of the first refused send
        self.last_error = ""
        self._said_unreachable = False
        self.monitor: SystemMetricsMonitor | None = None  # `watch_system`

    def configure(self, server_wait_s: float, server_unreachable: str) -> Tracker:
        self.server_wait_s, self.server_unreachable = server_wait_s, server_unreachable
        return self

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """All of an epoch's metrics in one batch, at step=epoch (NaN values are skipped)."""
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(v), now, epoch)
            for key, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        if batch:
            self._send(batch)
        self._check_server()

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Each of `datasets` ({"name", "digest", "source": a folder, "context": e.g. "train",
        "rows"}) as an input of the run (the runs table's Dataset column, the run's Datasets
        section), unless the run has it already (a resumed run)."""
        store = self._synced()
        had = {
            (
                i.dataset.name,
                i.dataset.digest,
                {t.key: t.value for t in i.tags}.get(MLFLOW_DATASET_CONTEXT),
            )
            for i in store.get_run(self.run_id).inputs.dataset_inputs
        }
        inputs = [
            DatasetInput(
                Dataset(
                    d["name"], d["digest"], "local", json.dumps({"uri": str(d["source"])}),
                    profile=json.dumps({"num_rows": d["rows"]}),
                ),
                [InputTag(MLFLOW_DATASET_CONTEXT, d["context"])],
            )
            for d in datasets
            if (d["name"], d["digest"], d["context"]) not in had
        ]  # fmt: skip
        if inputs:
            try:
                store.log_inputs(self.run_id, datasets=inputs)
            except TrackingError:
                # Two runs of one experiment logging the same new dataset at once (two machines
                # on a team server): the store keeps one row per name and digest and refuses the
                # second insert; once the first is in, logging again finds and links it.
                store.log_inputs(self.run_id, datasets=inputs)

    def watch_system(self, resumed: bool = False) -> None:
        """This machine's CPU, memory, disk, network and GPU figures (NVIDIA's through
        nvidia-ml-py) as the run's `system/...` metrics (its System metrics tab), sampled every
        SYSTEM_METRICS_S by MLflow's SystemMetricsMonitor, a thread of its own, until `end`
        (`resumed`: their steps go on from the run's last). Best effort: its errors are not
        shown, and a server that does not answer stops the sampling, never training."""
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        with suppress(Exception):
            monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=SYSTEM_METRICS_S, resume_logging=resumed,
                tracking_uri=self.uri,
            )  # fmt: skip
            monitor.start()
            self.monitor = monitor

    def _stop_watching(self) -> None:
        """Stop the system metrics' thread; wait at most SYSTEM_METRICS_STOP_S for its last
        figures (a server that does not answer would hold it longer)."""
        monitor, self.monitor = self.monitor, None
        if monitor is None:
            return

        def finish() -> None:
            with suppress(Exception):
                monitor.finish()

        stopper = threading.Thread(target=finish, name="stop-system-metrics", daemon=True)
        stopper.start()
        stopper.join(SYSTEM_METRICS_STOP_S)

    def _send(self, batch: list[Metric]) -> None:
        operations = self.store.client.log_batch(self.run_id, metrics=batch, synchronous=False)
        # RunOperations offers only a wait without a time limit: its futures say whether a
        # batch is done without waiting.
        self.sent.append((time.monotonic(), batch, operations._operation_futures))

    def _settle(self) -> None:
        """Forget the batches the store took; send again those a server refused. A local
        store that refuses one fails the run (one line naming the store)."""
        for entry in list(self.sent):
            at, batch, futures = entry
            if not all(f.done() for f in futures):
                continue
            self.sent.remove(entry)
            error = next(filter(None, (f.exception() for f in futures)), None)
            if error is None:
                self.failing_since = None
            elif not _remote(self.uri):
                raise _store_error(self.uri, error, self.run_id)
            else:
                self.last_error = one_line(error).split("[")[-1].rstrip("]")
                self.failing_since = min(self.failing_since or at, at)
                self._send(batch)

    def unreachable_s(self) -> float:
        """How long the server has refused the oldest batch not yet taken (0 while it answers)."""
        self._settle()
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since

    def _check_server(self) -> None:
        """Say once that the server has not answered for server_wait_s, or stop the run."""
        waited = self.unreachable_s()
        if waited < self.server_wait_s:
            return
        why = (
            f"The MLflow server {self.uri} has not answered for {waited:.0f} s ({self.last_error})"
        )
        if self.server_unreachable == "stop":
            raise TrackingError(
                f"{why}; stopped (server_unreachable = 'stop'). last.pt holds every epoch: "
                "resume with --resume once the server is back."
            )
        if not self._said_unreachable:
            self._said_unreachable = True
            print(
                f"warning: {why}; training goes on, and {len(self.sent)} epochs' metrics are "
                "kept (also in last.pt) and sent when it is back.",
                file=sys.stderr,
                flush=True,
            )

    def _synced(self, timeout_s: float = END_WAIT_S) -> Store:
        """The store, once it has taken the epochs' metrics not yet taken (a server that does
        not answer for `timeout_s`: one line)."""
        deadline = time.monotonic() + timeout_s
        self._settle()
        while self.sent:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(
                    f"The MLflow server {self.uri} has not answered for {self.unreachable_s():.0f}"
                    f" s ({self.last_error}); {len(self.sent)} epochs' metrics were not sent. "
                    "last.pt holds them: resume with --resume once the server is back."
                )
            if self.failing_since is not None:
                time.sleep(min(left, RETRY_S))
            else:
                concurrent.futures.wait([f for *_, fs in self.sent for f in fs], timeout=left)
            self._settle()
        return self.store

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        self._synced().log_batch(self.run_id, params=items)

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._synced().log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._synced().log_artifact(self.run_id, str(path), artifact_path=subdir)

    def log_text(self, text: str, name: str) -> None:
        self._synced().log_text(self.run_id, text, name)

    def logged_steps(self, key: str) -> list[int]:
        return sorted(m.step for m in self._synced().get_metric_history(self.run_id, key))

    def log_model(
        self, name: str, step: int, register_as: str = "", alias: str = "", **model: Any
    ) -> Any:
        """Log the model `name` of the run with MLflow's `Model.log(**model)` (its flavor,
        python_model, artifacts, code_paths, signature, ...), its metrics at `step`, registered
        as `register_as` when given, that version given the registry alias `alias` when given
        (models:/<register_as>@<alias>); its registered version, else None. No fluent run is
        started or left active and the run's status is not touched."""
        store = self._synced()
        # Loading the model to check its input example prepends code/ to sys.path.
        kept_path = mock.patch.object(sys, "path", list(sys.path))
        with store.errors(), tracking_uri_set(self.uri), quiet(), kept_path:
            # Created here, in the run's experiment: left to itself, Model.log puts a model
            # logged without an active run into the default experiment ('0').
            params = store.client.get_run(self.run_id).data.params
            logged = store.client.create_logged_model(
                self.experiment_id, name=name, source_run_id=self.run_id, params=params
            )
            info = Model.log(
                artifact_path=None, name=name, model_id=logged.model_id, run_id=self.run_id,
                step=step, registered_model_name=register_as or None, **model,
            )  # fmt: skip
            version = getattr(info, "registered_model_version", None)
            if alias and version is not None:
                store.client.set_registered_model_alias(register_as, alias, str(version))
        return version

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run `status` and let the signals go.

        `end("FINISHED")` raises a pending Ctrl-C or SIGTERM instead (before or after the
        write), so the caller marks the run KILLED and the program exits with 130 or 143.
        A run that did not finish waits only a few seconds for its metrics (last.pt has them).
        """
        finished = status == "FINISHED"
        self._stop_watching()  # before the status: its last figures still go to a running run
        try:
            if not finished:
                with suppress(TrackingError):
                    self._synced(5.0)
                self.sent = []
            with self._synced().errors(interruptible=finished):
                if status == "RUNNING":  # left to another process (a sweep's parent): not ours
                    # No status written: that process may have marked it FINISHED meanwhile.
                    for key in holder():
                        self.store.client.delete_tag(self.run_id, key)
                else:
                    self.store.client.set_terminated(self.run_id, status=status)
        except TrackingError:
            if finished:
                raise  # else the error that ended the run is the one to show
        finally:
            self.sent = []
            self.holds_signals = False
            self.signals.close()


@contextmanager
def ended_on_error(tracker: NullTracker) -> Iterator[None]:
    """A run whose set-up fails ends KILLED on Ctrl-C or SIGTERM, else FAILED (not RUNNING
    forever)."""
    try:
        yield
    except BaseException as e:
        tracker.end("FAILED" if interrupts.stop_of(e) is None else "KILLED")
        raise


def _experiment_id(store: Store, name: str) -> str:
    """The id of the experiment `name`, created if new (artifacts beside a SQLite store)."""
    exp = store.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' is deleted; restore it in the UI or pick another "
                "--experiment-name."
            )
        return exp.experiment_id
    sqlite_dir = _sqlite_dir(store.uri)
    location = (sqlite_dir / "mlruns" / slug(name)).as_uri() if sqlite_dir else None
    # The UI opens on its GenAI views unless the experiment says it is for model training.
    kind = {"mlflow.experimentKind": "custom_model_development"}
    try:
        return store.create_experiment(name, artifact_location=location, tags=kind)
    except TrackingError:
        # Two processes (machines on a team server) creating it at once: one of them made it.
        exp = store.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start(
    uri: str,
    experiment_name: str,
    run_name: str,
    tags: dict[str, Any],
    params: dict[str, Any] | None = None,
    texts: dict[str, str] | None = None,
) -> Tracker:
    """A new run of the experiment `experiment_name` (created if new) in the store `uri`:
    `tags` plus the git commit and dirty flag, `params`, and `texts` (artifact path -> text;
    a run given texts also gets the git diff of a dirty checkout, environment/git_diff.patch).
    A run whose records fail ends FAILED."""
    check_server(uri)
    store = Store(uri)
    experiment_id = _experiment_id(store, experiment_name)
    end_orphans(store, experiment_id)
    git = git_state()
    tags = {"git.commit": git["commit"], "git.dirty": git["dirty"], **holder(), **tags}
    tags_str = {k: str(v) for k, v in tags.items()}
    run = store.create_run(experiment_id, run_name=run_name or None, tags=tags_str)
    _say_if_store_moved(uri, run.info.artifact_uri)
    tracker = Tracker(store, experiment_id, run.info.run_id)
    if texts and git["diff"]:
        texts = {**texts, "environment/git_diff.patch": git["diff"]}
    with ended_on_error(tracker):
        if params:
            tracker.log_params(params)
        for name, text in (texts or {}).items():
            tracker.log_text(text, name)
    return tracker


def _say_if_store_moved(uri: str, artifact_uri: str) -> None:
    """One warning when a SQLite store was moved (a moved clone): MLflow keeps the artifacts
    folder an experiment was given beside the store (`mlruns/<experiment>`) as an absolute
    path, and writes the run's artifacts there, at the old place."""
    folder = _sqlite_dir(uri)
    if folder is None or not artifact_uri.startswith("file://"):
        return
    artifacts = Path(urllib.parse.unquote(urllib.parse.urlparse(artifact_uri).path))
    above = artifacts.parents  # <store folder>/mlruns/<experiment>/<run id>/artifacts
    if len(above) < 4 or above[2].name != "mlruns":
        return  # a location the experiment was given otherwise (not made beside a store)
    made_beside = above[3]
    if made_beside.resolve() != folder.resolve():
        print(
            f"warning: the MLflow store {uri} was moved from {made_beside}: this run's artifacts "
            f"go to {artifacts}, where its experiment was made. A new --experiment-name keeps "
            "them beside the store.",
            file=sys.stderr,
            flush=True,
        )


def reopen(uri: str, run_id: str) -> Tracker:
    """The run `run_id` (which did not finish, or is resumed) marked RUNNING again."""
    check_server(uri)
    run = get_run(uri, run_id)
    store = Store(uri)
    store.update_run(run_id, status="RUNNING")
    store.log_batch(run_id, tags=[RunTag(k, v) for k, v in holder().items()])
    if "status.reason" in run.data.tags:  # why it was marked FAILED: no longer its status
        store.delete_tag(run_id, "status.reason")
    end_orphans(store, run.info.experiment_id)
    _say_if_store_moved(uri, run.info.artifact_uri)
    return Tracker(store, run.info.experiment_id, run_id)


def holder() -> dict[str, str]:
    """This process as the tags of the runs it holds: host, pid and start time (a pid that the
    system gives again later is another process's, started later)."""
    process = psutil.Process()
    host, pid, started = socket.gethostname(), str(process.pid), str(process.create_time())
    return {"process.host": host, "process.pid": pid, "process.started": started}


def _gone(tags: dict[str, str]) -> bool:
    """Whether the process of this host that `tags` (`holder()`) name has ended."""
    try:
        process = psutil.Process(int(tags["process.pid"]))
        reused = abs(process.create_time() - float(tags["process.started"])) > 1.0
        return reused or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except (KeyError, ValueError):  # not tags of `holder()`: leave the run alone
        return False


_NAMED: set[str] = set()  # the runs of other hosts this process has named


def end_orphans(store: Store, experiment_id: str) -> None:
    """Mark FAILED, and say so, the store's RUNNING runs whose process on this host ended
    without ending them (SIGKILL; a store that could not take the status then); name those of
    the experiment `experiment_id` held by another host, which only that host can check."""
    host = socket.gethostname()
    ids = [e.experiment_id for e in store.search_experiments()]
    for run in store.search_runs(ids, "attributes.status = 'RUNNING'"):
        tags, run_id = run.data.tags, run.info.run_id
        what = f"run {run_id} ({run.info.run_name!r})"
        if tags.get("process.host") == host and _gone(tags):
            why = f"its process {tags['process.pid']} on {host} ended without ending it"
            store.set_tag(run_id, "status.reason", f"{why}; marked FAILED by a later command")
            store.set_terminated(run_id, "FAILED")
            print(f"warning: {what} was RUNNING but {why}; marked FAILED.", file=sys.stderr)
        elif tags.get("process.host", host) != host and run.info.experiment_id == experiment_id:
            if run_id not in _NAMED:
                _NAMED.add(run_id)
                print(
                    f"note: {what} is RUNNING on host {tags['process.host']}; only that host "
                    "can tell whether its process still runs.",
                    file=sys.stderr,
                )


def find_group(uri: str, experiment_name: str, key: str) -> tuple[str | None, dict[str, Any]]:
    """The parent run of the group `key` (tag `group.key`) if its newest one did not finish,
    and that parent's child runs by run name (the newest of each name); else (None, {})."""
    try:
        found = find_runs(uri, experiment_name, f"tags.`group.key` = '{key}'", True, 1)
    except TrackingError:  # no such experiment yet
        return None, {}
    if not found or found[0].info.status == "FINISHED":
        return None, {}
    parent_id = found[0].info.run_id
    return parent_id, {r.info.run_name: r for r in child_runs(uri, parent_id)}
