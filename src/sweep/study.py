"""A sweep's Optuna study: its storage, which trials count, and trials a stopped sweep left.

The study is the sweep's record: its storage (`--storage`, default a SQLite file next to the
MLflow store) holds every trial, and the study's user attributes hold the id of the parent
MLflow run. Whoever creates the study (one process, the storage decides) creates the parent
run; a second process or machine with the same `--study-name` joins both.

A trial counts towards `--trials` when it is complete, pruned, running, or failed by its own
error; a trial stopped by Ctrl-C, SIGTERM or SIGKILL does not: it is marked failed and retried
with the same values (Optuna's `RetryFailedTrialCallback`), and the retry resumes its MLflow
run from its last.pt. A trial stopped by a signal enqueues its retry as it stops. A trial
whose process died (SIGKILL, a machine gone) is found by Optuna's heartbeat alone, whatever
machine it ran on: a running trial whose heartbeat has been silent for the grace period
(`SWEEP_GRACE_S`, default 120 s; the heartbeat beats every `SWEEP_HEARTBEAT_S`, default 30 s)
is failed and retried by the next worker that looks (`fail_stale_trials`), once.

Counting and starting a trial are two steps, and the storage has no lock over both: the
processes of one machine take turns (`MachineLock`, a file lock that also keeps two workers
from drawing with the same seed), but machines do not, so a study run from several machines
can end with more than --trials trials: at most one more per other machine that counted at
the same moment (tests/test_postgres.py, two machines and --trials 3: 3 or 4 trials).
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

HEARTBEAT_S = 30  # default of SWEEP_HEARTBEAT_S
GRACE_S = 120  # default of SWEEP_GRACE_S
MAX_RETRY = 3
PARENT_ATTR = "mlflow.parent_run_id"
SPACE_ATTR = "sweep.space"
WORKER_ATTR = "sweep.worker"  # "host:pid" of the process running the trial, to read
PROCESS_ATTR = "sweep.process"  # the sweep process (a random id) whose worker ran the trial
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


def heartbeat() -> tuple[int, int]:
    """(beat, grace) in seconds: `SWEEP_HEARTBEAT_S` and `SWEEP_GRACE_S` when set, else
    HEARTBEAT_S and GRACE_S. A trial whose heartbeat has been silent for `grace` seconds is
    failed and retried; short values let a test see a killed worker's trial retried soon."""
    values = []
    for name, default in (("SWEEP_HEARTBEAT_S", HEARTBEAT_S), ("SWEEP_GRACE_S", GRACE_S)):
        text = os.environ.get(name, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            value = 0
        if value < 1:
            raise ConfigError(f"{name} must be a whole number of seconds above 0, got {text!r}.")
        values.append(value)
    beat, grace = values
    if grace <= beat:
        raise ConfigError(
            f"SWEEP_GRACE_S ({grace}) must be longer than SWEEP_HEARTBEAT_S ({beat}): a live "
            "trial's heartbeat would look silent."
        )
    return beat, grace


class MachineLock:
    """One process of this machine at a time: creating the study, counting and starting a
    trial (`release` once the trial is in the storage). Processes of other machines are not
    held, and nothing relies on it: without it, a study ends at most a few trials past
    --trials, and two workers may draw with the same seed (src/sweep/trial.py)."""

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
    beat, grace = heartbeat()
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=kwargs,
                heartbeat_interval=beat,
                grace_period=grace,
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


def fail_stale(study: Any) -> None:
    """Fail the trials whose heartbeat has been silent for the grace period, and retry them
    (Optuna's `fail_stale_trials`, which the storage's row update makes happen once)."""
    import optuna

    with warnings.catch_warnings():  # marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def ended(study: Any) -> list[Any]:
    """Complete, pruned and failed trials, in the order they ended; a trial stopped by a
    signal or failed by a silent heartbeat is left out (its retry takes its place)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)

    def shown(t: Any) -> bool:
        if t.state == TrialState.FAIL:
            return t.number not in retried and not t.user_attrs.get(STOPPED_ATTR)
        return t.state in (TrialState.COMPLETE, TrialState.PRUNED)

    return sorted(filter(shown, trials), key=lambda t: (t.datetime_complete, t.number))


def _retried(trials: list[Any]) -> set[int]:
    """The numbers of the trials that a retry has taken the place of."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}
