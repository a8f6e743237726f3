"""Everything MLflow: where runs go, starting and resuming a run, params, tags, metrics, artifacts.

The tracking URI is `MLFLOW_TRACKING_URI` (or the config's `run.tracking_uri`) when set, else
`sqlite:///<repo>/mlflow.db` with artifacts under `<repo>/mlruns`, so `mlflow ui` started in
the repository root shows every run. Only rank 0 of a distributed launch tracks anything:
the other ranks get a `NullTracker` with the same methods. A `Tracker` holds Ctrl-C and SIGTERM
until its run ends (src/interrupts.py): a signal is never lost and never cuts an MLflow write in
half.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import math
import os
import platform
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from src import interrupts
from src.config import REPO_ROOT, RESUME_MAY_CHANGE, ExperimentConfig, config_mismatch, to_toml
from src.errors import TrackingError, one_line
from src.outbox import Outbox

END_WAIT_S = 60.0  # how long a run at its end waits for a tracking server to come back
LOCAL_LINGER_S = 2.0  # a local store gets the epochs of this many seconds as one write
DEFAULT_URI = f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
RUNS_TABLE_SUFFIX = "runs?workflowType=machine_learning"


def tracking_uri(config: ExperimentConfig | None = None) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the repository's SQLite store."""
    if config is not None and config.run.tracking_uri:
        return config.run.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail at once, in one sentence, when an http(s) tracking server does not answer.

    The MLflow client would otherwise retry for minutes before the first metric is logged.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
            r.read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"The MLflow tracking server {uri} does not answer ({reason}); start it "
            "(see README.md, 'A team MLflow server') or pass another --tracking-uri."
        ) from None


def _sqlite_dir(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent
    return None


def ui_hint(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The command that opens the MLflow UI on this store, the link to the runs table and,
    given `run_id`, to that run's own page (its Model metrics tab, the curves)."""
    sqlite_dir = _sqlite_dir(uri)
    base = uri.rstrip("/") if sqlite_dir is None else "http://127.0.0.1:5000"
    run_page = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics"
    this_run = f"\nThis run: {run_page}" if run_id else ""
    if sqlite_dir is None:
        return f"Runs: {base}/#/experiments/{experiment_id}/{RUNS_TABLE_SUFFIX}{this_run}"
    try:
        shown = os.path.relpath(uri[len("sqlite:///") :], REPO_ROOT)
        if shown.startswith(".."):
            raise ValueError
        store = f"sqlite:///{shown}"
    except ValueError:
        store = uri
    mlflow_bin = os.path.relpath(Path(sys.executable).parent / "mlflow", REPO_ROOT)
    if mlflow_bin.startswith(".."):
        mlflow_bin = "mlflow"
    return (
        f"Open the MLflow UI (from {REPO_ROOT}): {mlflow_bin} ui --backend-store-uri {store}\n"
        f"then {base}/#/experiments/{experiment_id}/{RUNS_TABLE_SUFFIX}{this_run}"
    )


# ------------------------------------------------------------------ run records


def git_state() -> dict[str, str]:
    """Commit, dirty flag and diff of the repository (empty values outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        # Untracked files count: a new dataset or model module not yet added changes the run.
        status = git("status", "--porcelain", "--untracked-files=all")
        diff = git("diff", "HEAD") if status.strip() else ""
        for path in git("ls-files", "--others", "--exclude-standard", "-z").split("\0"):
            if path and (REPO_ROOT / path).is_file():
                diff += _new_file_diff(path)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": "unknown", "diff": ""}
    return {"commit": commit, "dirty": str(bool(status.strip())).lower(), "diff": diff}


def _new_file_diff(path: str, max_bytes: int = 1_000_000) -> str:
    """An untracked file as a git-style patch that adds it (a note when binary or large)."""
    data = (REPO_ROOT / path).read_bytes()
    header = f"diff --git a/{path} b/{path}\nnew file (untracked)\n"
    if len(data) > max_bytes or b"\0" in data:
        return header + f"# {len(data)} bytes, not shown\n"
    lines = data.decode("utf-8", errors="replace").splitlines()
    body = "".join(f"+{line}\n" for line in lines)
    return header + f"--- /dev/null\n+++ b/{path}\n@@ -0,0 +1,{len(lines)} @@\n" + body


def package_versions() -> dict[str, str]:
    import torch

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "mlflow", "numpy", "pillow", "scikit-learn"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    # What this torch was built for; "cuda"/"cudnn" only when a GPU is there to use them.
    out["cuda_build"] = torch.version.cuda or "none"
    gpu = torch.cuda.is_available()
    out["cuda"] = (torch.version.cuda or "none") if gpu else "none"
    cudnn = torch.backends.cudnn.version() if gpu and torch.backends.cudnn.is_available() else None
    out["cudnn"] = str(cudnn) if cudnn else "none"
    return out


def pip_freeze() -> str:
    dists = {
        f"{d.metadata['Name']}=={d.version}"
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }
    return "\n".join(sorted(dists, key=str.lower)) + "\n"


def data_fingerprint(dataset: Any) -> dict[str, Any]:
    """A hash of the ordered image ids and their labels, and the count.

    Two runs whose datasets differ in any id, order or label get different fingerprints.
    """
    h = hashlib.sha256()
    ids = list(dataset.image_ids)
    labels = np.ascontiguousarray(np.asarray(dataset.labels, dtype=np.float32))
    h.update("\n".join(ids).encode())
    h.update(str(labels.shape).encode())
    h.update(labels.tobytes())
    return {"fingerprint": h.hexdigest()[:16], "count": len(ids)}


def slug(name: str) -> str:
    """`name` as one folder name: runs of other characters become one '-', and leading and
    trailing dots and dashes go ('..' or '../x' never leave the folder they are put in)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "experiment"


# ------------------------------------------------------------------ trackers


class NullTracker:
    """What ranks other than 0 get: every call does nothing."""

    run_id = ""
    experiment_id = ""
    uri = ""

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None: ...

    def log_artifact(self, path: Path, subdir: str | None = None) -> None: ...

    def log_text(self, text: str, name: str) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...

    def logged_steps(self, key: str) -> list[int]:
        return []


class Tracker(NullTracker):
    """One MLflow run, driven through `MlflowClient` (no global 'active run' state).

    It holds Ctrl-C and SIGTERM until `end` (src/interrupts.py): its calls raise a signal's
    interrupt that Python lost. Epochs' metrics go through an `Outbox` (src/outbox.py):
    training does not wait for the store, and a local store gets the epochs of the last
    `LOCAL_LINGER_S` seconds as one write (a fast run's epochs go together; an epoch longer
    than that is written as it ends). When a tracking server has not answered for
    `server_wait_s`, the run says so once and trains on, or stops with a one-line error when
    `server_unreachable = "stop"`; at its end the run waits up to `END_WAIT_S` for it.
    """

    def __init__(self, client: Any, uri: str, experiment_id: str, run_id: str) -> None:
        self.client = client
        self.uri = uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.holds_signals = interrupts.hold()
        self.remote = uri.startswith(("http://", "https://"))
        self.outbox: Outbox | None = None
        self.server_wait_s = 60.0
        self.server_unreachable = "continue"
        self._said_unreachable = False

    def configure(self, config: ExperimentConfig) -> Tracker:
        self.server_wait_s = float(getattr(config.run, "server_wait_s", 60.0))
        self.server_unreachable = getattr(config.run, "server_unreachable", "continue")
        return self

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        """All of an epoch's metrics in one call, at step=epoch (NaN values are skipped)."""
        now = int(time.time() * 1000)
        batch = [
            (key, float(v), now, epoch)
            for key, v in metrics.items()
            if v is not None and not math.isnan(float(v))
        ]
        if self.outbox is None:
            linger = 0.0 if self.remote else LOCAL_LINGER_S
            self.outbox = Outbox(self._log_metrics, linger_s=linger, retry=self.remote)
        self.outbox.put(batch)
        if self.remote:
            self._check_server()
        elif self.outbox.error is not None:  # a local store's errors are not the user's to fix
            raise self.outbox.error

    def _log_metrics(self, batch: list) -> None:
        for i in range(0, len(batch), 1000):
            self._log_batch(metrics=batch[i : i + 1000])

    def _log_batch(self, metrics=(), params=(), tags=()) -> None:
        """Metrics (key, value, timestamp, step), params and tags (key, value) as tuples: the
        tracking process's client (src/tracking_service.py) takes them so (`log_tuples`),
        MLflow's own client as entities."""
        log_tuples = getattr(self.client, "log_tuples", None)
        if log_tuples is not None:
            log_tuples(self.run_id, metrics, params, tags)
            return
        from mlflow.entities import Metric, Param, RunTag

        self.client.log_batch(
            self.run_id,
            metrics=[Metric(*m) for m in metrics],
            params=[Param(*p) for p in params],
            tags=[RunTag(*t) for t in tags],
        )

    def _check_server(self) -> None:
        assert self.outbox is not None
        waited = self.outbox.unreachable_s()
        if waited < self.server_wait_s:
            return
        why = f"The MLflow server {self.uri} has not answered for {waited:.0f} s"
        why += f" ({self.outbox.last_error})"
        if self.server_unreachable == "stop":
            raise TrackingError(
                f"{why}; stopped (server_unreachable = 'stop'). last.pt holds every epoch: "
                "resume with --resume once the server is back."
            )
        if not self._said_unreachable:
            self._said_unreachable = True
            print(
                f"warning: {why}; training goes on, and {self.outbox.pending()} epochs' "
                "metrics are kept (also in last.pt) and sent when it is back.",
                file=sys.stderr,
                flush=True,
            )

    def _call(self, fn: Any, *args: Any, interruptible: bool = True, **kwargs: Any) -> Any:
        """One MLflow call, after the epochs waiting in the outbox; a server that does not
        answer is one line, not a traceback."""
        if self.outbox is not None and not self.outbox.drain(END_WAIT_S):
            if self.outbox.error is not None:
                raise self.outbox.error
            raise TrackingError(
                f"The MLflow server {self.uri} has not answered for "
                f"{self.outbox.unreachable_s():.0f} s ({self.outbox.last_error}); "
                f"{self.outbox.pending()} epochs' metrics were not sent. last.pt holds them: "
                "resume with --resume once the server is back."
            )
        with interrupts.mlflow_call(interruptible):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if not self.remote:  # a local store's errors are not the user's to fix
                    raise
                raise TrackingError(
                    f"The MLflow server {self.uri} failed: {one_line(e)}; resume with "
                    "--resume once it answers again."
                ) from None

    def log_params(self, params: dict[str, Any]) -> None:
        items = [(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call(self._log_batch, params=items[i : i + 100])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self._call(self._log_batch, tags=items[i : i + 100])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._call(self.client.log_artifact, self.run_id, str(path), artifact_path=subdir)

    def log_text(self, text: str, name: str) -> None:
        self._call(self.client.log_text, self.run_id, text, name)

    def logged_steps(self, key: str) -> list[int]:
        history = self._call(self.client.get_metric_history, self.run_id, key)
        return sorted(m.step for m in history)

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run `status` and let the signals go.

        `end("FINISHED")` raises a pending Ctrl-C or SIGTERM instead (before or after the
        write), so the caller marks the run KILLED and the program exits with 130 or 143.
        A run that did not finish does not wait for a server that does not answer.
        """
        finished = status == "FINISHED"
        try:
            if not finished and self.outbox is not None:
                self.outbox.drain(5.0)
                self.outbox.close()
                self.outbox = None
            try:
                self._call(
                    self.client.set_terminated, self.run_id, status=status, interruptible=finished
                )
            except TrackingError:
                if not getattr(self.client, "ended", lambda: False)():
                    raise
                # The tracking process is gone (src/tracking_service.py): the run's status is
                # written from here, so that it is not left RUNNING; a run that was to finish
                # lost what the process had not written yet, and ends FAILED.
                self.client = _client(self.uri)
                self._call(
                    self.client.set_terminated,
                    self.run_id,
                    status="FAILED" if finished else status,
                    interruptible=finished,
                )
                raise
        except TrackingError:
            if finished:
                raise  # else the error that ended the run is the one to show
        finally:
            if self.outbox is not None:
                self.outbox.close()
                self.outbox = None
            if self.holds_signals:
                self.holds_signals = False
                interrupts.release()


def client_for(config: ExperimentConfig) -> Any:
    """An MlflowClient of the config's store, set up as every client of the repository is
    (`_client`: short HTTP retries, the SQLite store's folder and tables made once)."""
    return _client(tracking_uri(config))


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if uri.startswith(("http://", "https://")):
        # MLflow retries a request 7 times with a doubling back-off (minutes in all) before
        # it fails: a few seconds, then the run's own handling (src/outbox.py) takes over.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    sqlite_dir = _sqlite_dir(uri)
    if sqlite_dir is None or uri in _READY_STORES:
        return MlflowClient(tracking_uri=uri)
    sqlite_dir.mkdir(parents=True, exist_ok=True)
    # MLflow creates a new SQLite store's tables on first use; runs that start together (a
    # job array) would each create them and all but one crash ("table ... already exists"):
    # the first use is one process at a time.
    with open(sqlite_dir / f"{Path(uri).name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS mounts): go on unguarded
            pass
        with interrupts.mlflow_call():
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
    _READY_STORES.add(uri)
    return client


_READY_STORES: set[str] = set()


def get_or_create_experiment(client: Any, uri: str, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' is deleted; restore it in the UI or pick another "
                "--experiment-name."
            )
        return exp.experiment_id
    sqlite_dir = _sqlite_dir(uri)
    location = (sqlite_dir / "mlruns" / slug(name)).as_uri() if sqlite_dir else None
    # The UI opens on its GenAI views unless the experiment says it is for model training.
    return client.create_experiment(
        name,
        artifact_location=location,
        tags={"mlflow.experimentKind": "custom_model_development"},
    )


def _open_experiment(config: ExperimentConfig) -> tuple[Any, str, str]:
    """(client, tracking URI, experiment id) of the config's experiment, created if new; the
    client is the tracking process's (src/tracking_service.py) when one was started."""
    from src import tracking_service

    uri = tracking_uri(config)
    check_server(uri)
    client = tracking_service.client(uri) or _client(uri)
    return client, uri, get_or_create_experiment(client, uri, config.run.experiment_name)


def start(
    config: ExperimentConfig,
    enabled: bool = True,
    parent_run_id: str | None = None,
    extra_tags: dict[str, Any] | None = None,
) -> NullTracker:
    """Create the run of `config` and record what makes it reproducible.

    Records: params = the flattened config; tags = git commit and dirty flag, package
    versions, seed, device; artifacts = the resolved config TOML, `pip freeze`, and the git
    diff when the checkout is dirty.
    """
    if not enabled:
        return NullTracker()
    client, uri, experiment_id = _open_experiment(config)
    tags: dict[str, Any] = {
        "seed": config.run.seed,
        "deterministic": config.run.deterministic,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    git = git_state()
    tags.update({"git.commit": git["commit"], "git.dirty": git["dirty"]})
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    tags.update(extra_tags or {})
    run = client.create_run(
        experiment_id,
        run_name=config.run.run_name,
        tags={k: str(v) for k, v in tags.items()},
    )
    tracker = Tracker(client, uri, experiment_id, run.info.run_id).configure(config)
    with ended_on_error(tracker):
        tracker.log_params(config.flat())
        tracker.log_text(to_toml(config), "config/config.toml")
        tracker.log_text(pip_freeze(), "environment/pip_freeze.txt")
        if git["diff"]:
            tracker.log_text(git["diff"], "environment/git_diff.patch")
    return tracker


@contextmanager
def ended_on_error(tracker: Tracker) -> Iterator[None]:
    """A run whose set-up fails ends KILLED on Ctrl-C or SIGTERM, else FAILED (not RUNNING
    forever)."""
    try:
        yield
    except BaseException as e:
        tracker.end("FAILED" if interrupts.stop_of(e) is None else "KILLED")
        raise


def resume(config: ExperimentConfig, run_id: str, enabled: bool = True) -> NullTracker:
    """Reopen the run `run_id` for a resumed training; its params must equal the config's."""
    if not enabled:
        return NullTracker()
    uri = tracking_uri(config)
    check_server(uri)
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MlflowException for an unknown id
        raise TrackingError(
            f"MLflow run {run_id} (from the checkpoint) is not in the store {uri}: {e}; "
            "resume with the same --tracking-uri as the original run."
        ) from None
    logged = run.data.params
    mismatch = config_mismatch(logged, config, may_differ=RESUME_MAY_CHANGE, as_params=True)
    if mismatch is not None:
        key, theirs, ours = mismatch
        raise TrackingError(
            f"Config key {key} is {ours!r} but the run being resumed used {theirs!r}; resume "
            "with the original config (params cannot change)."
        )
    flat = config.flat()
    changed = {  # "train longer": params stay, a tag says so
        f"resumed.{key}": flat[key]
        for key in RESUME_MAY_CHANGE
        if logged.get(key) != str(flat[key])
    }
    client.update_run(run_id, status="RUNNING")
    tracker = Tracker(client, uri, run.info.experiment_id, run_id).configure(config)
    with ended_on_error(tracker):
        tracker.set_tags(changed)
    return tracker


def find_group(config: ExperimentConfig, key: str) -> tuple[str | None, dict[str, Any]]:
    """The parent run of the group `key` (tag `group.key`) if its newest one did not finish,
    and that parent's child runs by run name (the newest of each name); else (None, {})."""
    client = _client(tracking_uri(config))
    with interrupts.mlflow_call():
        exp = client.get_experiment_by_name(config.run.experiment_name)
        if exp is None:
            return None, {}
        parents = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`group.key` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents or parents[0].info.status == "FINISHED":
            return None, {}
        parent_id = parents[0].info.run_id
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
        )
    return parent_id, {r.info.run_name: r for r in children}


def start_parent(
    config: ExperimentConfig,
    run_name: str,
    tags: dict[str, Any],
    enabled: bool = True,
    reopen: str | None = None,
) -> NullTracker:
    """A run in the config's experiment without the config's params: the parent that groups
    child runs (a grid or a set of seeds), or a run that only holds pictures (Demo-0).
    `reopen`: the id of a parent that did not finish, marked RUNNING again."""
    if not enabled:
        return NullTracker()
    client, uri, experiment_id = _open_experiment(config)
    if reopen is not None:
        with interrupts.mlflow_call():
            client.update_run(reopen, status="RUNNING")
        return Tracker(client, uri, experiment_id, reopen)
    git = git_state()
    all_tags = {"git.commit": git["commit"], "git.dirty": git["dirty"], **tags}
    run = client.create_run(
        experiment_id, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()}
    )
    return Tracker(client, uri, experiment_id, run.info.run_id)
