"""A sweep's Optuna study: its storage, which trials count, and trials a stopped sweep left.

The study is the sweep's record: its storage (`--storage`, default a SQLite file next to the
MLflow store) holds every trial, and the study's user attributes hold the id of the parent
MLflow run. Whoever creates the study (one process, the storage decides) creates the parent
run; a second process or machine with the same `--study-name` joins both.

A trial counts towards `--trials` when it is complete, pruned, running, or failed by its own
error; a trial stopped by Ctrl-C, SIGTERM or SIGKILL does not: it is marked failed and retried
with the same values (Optuna's `RetryFailedTrialCallback`), and the retry resumes its MLflow
run from its last.pt. Trials of a process that died on this machine are found at once (their
process id is gone); those of another machine, when its heartbeat has stopped for
`GRACE_S` seconds (Optuna's heartbeat).
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import src.tracking as tracking
from src.config import REPO_ROOT, ExperimentConfig
from src.errors import ConfigError, TrackingError, one_line

HEARTBEAT_S = 30
GRACE_S = 120
MAX_RETRY = 3
PARENT_ATTR = "mlflow.parent_run_id"
SPACE_ATTR = "sweep.space"
WORKER_ATTR = "sweep.worker"  # "host:pid" of the process running the trial
STOPPED_ATTR = "sweep.stopped"  # True: ended by a signal, to be retried
FINISHED_ATTR = "sweep.finished"  # True once every trial ended and the summary is logged


def default_storage(config: ExperimentConfig) -> str:
    """A SQLite file next to the MLflow store (its folder), else in the repository root."""
    uri = tracking.tracking_uri(config.run.tracking_uri)
    folder = Path(uri[len("sqlite:///") :]).parent if uri.startswith("sqlite:///") else REPO_ROOT
    return f"sqlite:///{folder / 'optuna.db'}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for tags and printed lines."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: the storage check says so
        return url


class MachineLock:
    """One process of this machine at a time: creating the study, counting and starting a
    trial (`release` once the trial is in the storage). Processes of other machines are not
    held: a study run from several machines may end a few trials past --trials."""

    def __init__(self, storage_url: str, study_name: str) -> None:
        digest = hashlib.sha256(f"{storage_url}\n{study_name}".encode()).hexdigest()[:16]
        self.path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sweep-{digest}.lock"
        self.file: Any = None

    def __enter__(self) -> MachineLock:
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: go on unguarded
            pass
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file lets the lock go
            self.file = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, with heartbeats; a TrackingError when it cannot be
    reached or created (no driver, no such host or folder)."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        # Workers write at once: wait for the file's lock instead of failing at once.
        kwargs = {"connect_args": {"timeout": 60}}
    # Optuna 4.9 renamed the argument that retries a trial whose heartbeat stopped.
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    name = "heartbeat_stale_trial_callback"
    retry = {name if name in params else "failed_trial_callback": retry_callback()}
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                **retry,
            )
    except Exception as e:  # SQLAlchemy's and the drivers' errors, ImportError for a driver
        raise TrackingError(
            f"The Optuna storage {shown_url(url)} cannot be opened ({one_line(e)[:200]}); "
            "check --storage (e.g. sqlite:///sweeps.db or postgresql://user@host/db)."
        ) from None


def retry_callback() -> Any:
    import optuna

    with warnings.catch_warnings():  # deprecated alias in newer Optuna, same behaviour
        warnings.simplefilter("ignore")
        cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        cls = cls or optuna.storages.RetryFailedTrialCallback
        return cls(max_retry=MAX_RETRY)


def study_to_use(storage: Any, base: str) -> str:
    """`base`, or `base-2`, `base-3`...: the newest of them that has not finished, else the
    next new name. The same command goes on with a stopped sweep, and after a finished one
    starts another (trained again: the code or the data may have changed since)."""
    names = {s.study_name: s for s in storage.get_all_studies()}
    newest, n = None, 1
    while (name := base if n == 1 else f"{base}-{n}") in names:
        newest, n = names[name], n + 1
    if newest is not None and not newest.user_attrs.get(FINISHED_ATTR):
        return newest.study_name
    return name


def create_or_load(storage: Any, name: str, direction: str, sampler, pruner) -> tuple[Any, bool]:
    """(study, created): the study `name`, created here when it does not exist yet."""
    import optuna

    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction=direction, sampler=sampler, pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    want = "MAXIMIZE" if direction == "maximize" else "MINIMIZE"
    if study.direction.name != want:
        raise ConfigError(
            f"Study {name!r} {study.direction.name.lower()}s its objective, this command "
            f"{direction}s it; use another --study-name."
        )
    return study, False


def check_same_space(study: Any, space: dict[str, Any], name: str) -> None:
    """A study holds one space: a command with another one must name another study."""
    import json

    ours = json.dumps(space, sort_keys=True)
    theirs = study.user_attrs.get(SPACE_ATTR)
    if theirs is not None and theirs != ours:
        raise ConfigError(
            f"Study {name!r} searches another space or objective than this command; use "
            "another --study-name (or the same space file)."
        )


def wait_for_parent(study: Any, timeout_s: float = 120.0) -> str:
    """The parent run id the study's creator writes (it may still be starting it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        parent = study.user_attrs.get(PARENT_ATTR)
        if parent:
            return parent
        if time.monotonic() > deadline:
            raise TrackingError(
                f"Study {study.study_name!r} has no parent MLflow run after {timeout_s:.0f} s; "
                "the process that created it may have died: start the sweep with another "
                "--study-name."
            )
        time.sleep(1.0)


# ------------------------------------------------------------------ trials


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def counted(study: Any) -> int:
    """How many trials count towards --trials (see the module docstring)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

    def counts(t: Any) -> bool:
        if t.state == TrialState.FAIL:  # by its own error; a stopped one is retried instead
            return t.number not in retried and not t.user_attrs.get(STOPPED_ATTR)
        return t.state in live

    return sum(1 for t in trials if counts(t))


def retry_stopped(study: Any, storage: Any) -> list[int]:
    """Mark the trials that processes of this machine left running (their process is gone)
    failed, and retry every stopped trial not yet retried; returns their numbers."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    again = []
    for t in trials:
        owner = str(t.user_attrs.get(WORKER_ATTR, ""))
        if t.state == TrialState.RUNNING and owner.rpartition(":")[0] == host:
            if _alive(int(owner.rpartition(":")[2])):
                continue
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                storage.get_study_id_from_name(study.study_name), t.number
            )
            storage.set_trial_user_attr(trial_id, STOPPED_ATTR, True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            t = storage.get_trial(trial_id)
        if (
            t.state == TrialState.FAIL
            and t.user_attrs.get(STOPPED_ATTR)
            and t.number not in retried
        ):
            retry_callback()(study, t)
            again.append(t.number)
    return again


def _retried(trials: list[Any]) -> set[int]:
    """The numbers of the trials that a retry has taken the place of."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True
