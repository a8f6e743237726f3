"""Hyperparameter sweeps on Optuna: every trial a child MLflow run of one parent run.

    python -m src.sweep experiments/demo2_tinyconv_tinydata.toml \\
        --space experiments/demo2_lr_wd.sweep.toml --trials 20 --epochs 10
    python -m src.sweep ... --workers 4 --devices 0,1,2,3      # 4 trials at once, a GPU each
    python -m src.sweep ... --storage postgresql://user@db/optuna --study-name lr-wd  # per machine

The space file (src/sweep/space.py) names the config keys to vary, the objective (default:
maximize val_auroc_mean at the best epoch), the sampler and the pruner. The experiment file
and the flags shared with the Demos make the base config. Optuna's study, in `--storage`
(default: optuna.db next to the MLflow store), records the trials: running the same command
again after Ctrl-C, SIGTERM or SIGKILL goes on (finished trials kept, a stopped one retried);
after a sweep that finished, it starts a new study (`<name>-2`, ...) and parent run.
The parent run logs the best value so far per finished trial; at the end, the trials table,
the best config (a TOML experiment that runs as is) and Optuna's history and importance plots.
The sweep prints one line per trial as it ends; the trials' runs write their own lines (one per
epoch) to the sweep folder's worker-<i>.log, or print them too with --epoch-lines.
Demo-4 runs its grid through `run_sweep` too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import src.interrupts as interrupts
import src.sweep.study as sweep_study
import src.tracking as tracking
from src.cli import FlagParser, add_config_flags, load_from_args
from src.config import REPO_ROOT, ExperimentConfig
from src.errors import ConfigError, UserError, print_user_error
from src.sweep.multirun import start_parent
from src.sweep.space import SweepSpace, make_pruner, make_sampler, read_space
from src.sweep.trial import SweepPlan, work

POLL_S = 1.0
STOP_WAIT_S = 300.0  # how long stopped workers may take to mark their runs KILLED


class WorkerFailed(Exception):
    """A worker process ended with an error that is not the user's to fix (a traceback)."""


@dataclass
class SweepOptions:
    trials: int | None = None  # default: a grid's size; a search needs it
    workers: int | None = None  # default: one per device, else 1
    devices: list[str] = field(default_factory=list)
    storage: str | None = None
    study_name: str | None = None
    parent_name: str = "sweep"  # the parent run's name
    parent_tags: dict[str, Any] = field(default_factory=dict)
    child_names: str = "trial"  # the child runs' names: <run_name>-<child_names><N>
    # Trials run in this process print their runs' lines (device, every epoch) here; False:
    # one line per trial here, the runs' lines in the sweep folder's worker-0.log.
    epoch_lines: bool = True


@dataclass
class SweepOutcome:
    parent_run_id: str
    experiment_id: str
    study: Any
    plan: SweepPlan
    finished: bool  # every trial done (else trials of another process still run)


def run_sweep(
    config: ExperimentConfig,
    space: SweepSpace,
    options: SweepOptions,
    on_finish: Any = None,
) -> SweepOutcome:
    """Run the sweep; `on_finish(parent, outcome)` logs its summary (default: the trials
    table, the best config and the plots). Every check that can fail on the user's input runs
    before the parent run is created."""
    trials, workers = check_options(config, space, options)
    sampler = make_sampler(space, config.run.seed)  # bad arguments: one line, now
    make_pruner(space)
    tracking.check_server(tracking.tracking_uri(config.run.tracking_uri))
    url = options.storage or sweep_study.default_storage(config)
    key = sweep_key(config, space)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = sweep_study.open_storage(url)
    name = options.study_name or sweep_study.study_to_use(storage, f"{options.parent_name}-{key}")
    with sweep_study.MachineLock(url, name):
        study, created = sweep_study.create_or_load(storage, name, space.direction, sampler, None)
        if not created:
            sweep_study.check_same_space(study, space.to_dict(), name)
        tags = {**options.parent_tags, "group.key": key, "sweep.study": name}
        tags["sweep.storage"] = sweep_study.shown_url(url)
        tags.update({"sweep.metric": space.metric, "sweep.direction": space.direction})
        tags["sweep.params"] = " ".join(space.params)
        if created:
            parent = new_parent(config, study, options.parent_name, tags, space)
        else:
            parent = reopened_parent(config, study, options.parent_name, tags, trials)
    plan = SweepPlan(config, space, url, name, parent.run_id, trials, options.child_names)
    plan.process = uuid.uuid4().hex
    outcome = SweepOutcome(parent.run_id, parent.experiment_id, study, plan, False)
    return _run(parent, outcome, workers, options, on_finish or log_sweep_summary)


def _run(parent, outcome: SweepOutcome, workers: int, options: SweepOptions, on_finish) -> Any:
    from src.sweep.multirun import same_command
    from src.sweep.report import Progress

    plan, study = outcome.plan, outcome.study
    try:
        progress = Progress(parent, study, plan)
        progress.update()
        if workers == 1 and not options.devices:
            run_in_process(plan, progress, options.epoch_lines)
        else:
            run_workers(plan, workers, options.devices, progress)
        progress.update()
        outcome.finished = sweep_study.counted(study) >= plan.trials and not _running(study)
        outcome.finished = outcome.finished and _ours_to_finish(study, plan)
        if outcome.finished:
            on_finish(parent, outcome)
            study.set_user_attr(sweep_study.FINISHED_ATTR, True)
            parent.end("FINISHED")
        else:
            print(
                "Trials of another process still run or ended last; that process finishes "
                f"{plan.study_name}."
            )
            parent.end("RUNNING")  # theirs to finish
    except BaseException as e:
        stop = interrupts.stop_of(e)
        parent.end("FAILED" if stop is None else "KILLED")
        if stop is not None:
            print(
                f"\nSweep {plan.study_name} stopped; finished trials are kept. Run the same "
                f"command again to go on (a stopped trial is retried): {same_command()}",
                file=sys.stderr,
                flush=True,
            )
        raise
    return outcome


def _running(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _ours_to_finish(study: Any, plan: SweepPlan) -> bool:
    """Whether this process finishes the study that has all its trials: the one whose trial
    ended last does (another process may wait for it to end), or this one when it ran none
    (the same command again after the one that should have finished it died)."""
    trials = study.get_trials(deepcopy=False)
    ended = sweep_study.ended(study)
    if not any(t.user_attrs.get(sweep_study.PROCESS_ATTR) == plan.process for t in trials):
        return True
    return not ended or ended[-1].user_attrs.get(sweep_study.PROCESS_ATTR) == plan.process


def check_options(
    config: ExperimentConfig, space: SweepSpace, options: SweepOptions
) -> tuple[int, int]:
    """(trials, workers), or a ConfigError for options that do not fit."""
    trials = options.trials
    if space.is_grid:
        trials = min(trials or space.grid_size(), space.grid_size())
    elif trials is None:
        raise ConfigError("--trials N is needed: how many trials the search runs in all.")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}.")
    workers = options.workers or max(1, len(options.devices))
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}.")
    if options.devices:
        if config.run.device not in ("auto", "cuda"):
            raise ConfigError(
                f"--devices gives each worker one GPU, which it sees as cuda:0; run.device is "
                f"{config.run.device!r}: pass --device cuda (or auto)."
            )
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--devices names GPUs, but CUDA sees none; leave --devices out.")
    return trials, workers


def sweep_key(config: ExperimentConfig, space: SweepSpace) -> str:
    """What makes two commands the same sweep: the base config and the space."""
    text = json.dumps([config.flat(), space.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def new_parent(config, study, name: str, tags: dict[str, Any], space: SweepSpace) -> Any:
    """The parent run of a new study, its id and the space stored with the study."""
    parent = start_parent(config, name, tags)
    with tracking.ended_on_error(parent):
        study.set_user_attr(sweep_study.SPACE_ATTR, json.dumps(space.to_dict(), sort_keys=True))
        study.set_user_attr(sweep_study.PARENT_ATTR, parent.run_id)
    return parent


def reopened_parent(config, study, name: str, tags: dict[str, Any], trials: int) -> Any:
    """The parent run of a study that exists (another machine's, or a stopped sweep's)."""
    parent_id = sweep_study.wait_for_parent(study)
    uri = tracking.tracking_uri(config.run.tracking_uri)
    hint = f"it is the parent run of the study {study.study_name!r}: every machine of a sweep "
    tracking.get_run(uri, parent_id, hint + "needs the same --tracking-uri (a tracking server)")
    done = sweep_study.counted(study)
    print(f"Going on with {study.study_name} ({parent_id}): {done} of {trials} trials counted.")
    return start_parent(config, name, tags, reopen=parent_id)


def run_in_process(plan: SweepPlan, progress: Any, epoch_lines: bool) -> None:
    """The trials one after the other in this process, a line each as it ends (`progress`);
    their runs' own lines go to the sweep folder's worker-0.log, or here with `epoch_lines`."""
    if epoch_lines:
        work(plan, after_trial=progress.update)
        return
    folder = sweep_folder(plan.config, plan.study_name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "worker-0.log"
    print(
        f"{plan.trials} trials, one at a time; each run's epoch lines: {path} "
        "(--epoch-lines prints them here)",
        flush=True,
    )
    with open(path, "a", buffering=1) as log:  # a line at a time: `tail -f` follows it
        work(plan, after_trial=progress.update, output=log)


# ------------------------------------------------------------------ worker processes


def run_workers(plan: SweepPlan, workers: int, devices: list[str], progress: Any) -> None:
    """`workers` processes (`python -m src.sweep.trial`), until each has ended; a worker
    that fails or is stopped stops the others (their running trials end KILLED)."""
    folder = sweep_folder(plan.config, plan.study_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(plan.to_json())
    procs = [start_worker(i, workers, devices, folder) for i in range(workers)]
    print(f"{workers} workers; their output: {folder}/worker-<i>.log", flush=True)
    try:
        while True:
            codes = [p.poll() for p in procs]
            progress.update()
            for i, code in enumerate(codes):
                if code not in (None, 0):
                    raise worker_error(i, code, folder)
            if all(code == 0 for code in codes):
                return
            time.sleep(POLL_S)
    except BaseException as e:
        stop = interrupts.stop_of(e)
        stop_workers(procs, signal.SIGINT if type(stop) is KeyboardInterrupt else signal.SIGTERM)
        raise


def sweep_folder(config: ExperimentConfig, study_name: str) -> Path:
    base = Path(config.run.results_dir) / tracking.slug(config.run.experiment_name)
    return base / "sweeps" / tracking.slug(study_name)


def start_worker(i: int, workers: int, devices: list[str], folder: Path) -> subprocess.Popen:
    """Worker i: its GPU (`CUDA_VISIBLE_DEVICES`) and its share of the cores (CPU affinity,
    so `num_workers = "auto"` counts them, and OMP_NUM_THREADS)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    share = max(1, len(cores) // workers)
    mine = cores[i * share : (i + 1) * share] or cores[i % max(1, len(cores)) :][:1]
    env = {**os.environ}
    if mine and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(len(mine))
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
    log = open(folder / f"worker-{i}.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "src.sweep.trial", str(folder / "plan.json")],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches the sweep, which stops each worker once
    )
    log.close()
    if mine:
        os.sched_setaffinity(proc.pid, mine)
    return proc


def worker_error(i: int, code: int, folder: Path) -> BaseException:
    log = folder / f"worker-{i}.log"
    lines = log.read_text(errors="replace").strip().splitlines()
    if code in (130, -signal.SIGINT):
        return KeyboardInterrupt()
    if code in (143, -signal.SIGTERM):
        return interrupts.Preempted()
    if code == 2 and lines and lines[-1].startswith("error: "):
        return UserError(lines[-1][len("error: ") :])
    tail = "\n".join(lines[-15:])
    return WorkerFailed(f"Worker {i} failed (exit code {code}); the end of {log}:\n{tail}")


def stop_workers(procs: list[subprocess.Popen], signum: int) -> None:
    """Send each running worker `signum` once; wait for them to end their runs."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signum)
    deadline = time.monotonic() + STOP_WAIT_S
    for p in procs:
        while p.poll() is None:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
            except KeyboardInterrupt:  # asked again: do not wait (the same command resumes)
                p.kill()


# ------------------------------------------------------------------ summary and command line


def log_sweep_summary(parent: Any, outcome: SweepOutcome) -> None:
    import pandas as pd

    from src.sweep.report import describe_best, log_final

    folder = sweep_folder(outcome.plan.config, outcome.plan.study_name)
    table = log_final(parent, outcome.study, outcome.plan, folder)
    with pd.option_context("display.width", None, "display.max_columns", None):
        print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\n" + describe_best(outcome.study, outcome.plan))
    if (folder / "best_config.toml").is_file():
        print(f"Best config: {folder / 'best_config.toml'}")


def add_sweep_flags(parser: argparse.ArgumentParser, grid: bool = False) -> None:
    """--workers, --devices, --storage, --study-name (and --trials for a search)."""
    a = parser.add_argument
    if not grid:
        a("--space", required=True, help="the sweep's space file, e.g. experiments/X.sweep.toml")
        a("--trials", type=int, help="trials in all (a grid: default every cell)")
    a("--workers", type=int, help="trials at a time, each in its own process (default 1)")
    a("--devices", help="GPUs for the workers, e.g. 0,1,2,3: one per worker (CUDA_VISIBLE_DEVICES)")
    a("--storage", help="Optuna storage URL (default: sqlite:///optuna.db by the MLflow store)")
    a("--study-name", help="the Optuna study; the same name on several machines joins them")
    if not grid:
        a(
            "--epoch-lines",
            action="store_true",
            help="print the epoch lines of every trial too (default: one line per trial; the "
            "epoch lines go to results/<experiment>/sweeps/<study>/worker-<i>.log, where a "
            "worker of --workers K > 1 always writes them)",
        )


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    return SweepOptions(
        getattr(args, "trials", None), args.workers, devices, args.storage, args.study_name
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m src.sweep CONFIG --space SPACE --trials N [flags]`; the exit code."""
    parser = FlagParser(prog="python -m src.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="experiment TOML file, e.g. experiments/demo2.toml")
    add_config_flags(parser)
    add_sweep_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = load_from_args(args.config, args)
        space = read_space(args.space, config)
        options = options_from_args(args)
        options.parent_name = f"{config.run.run_name}-sweep"
        options.parent_tags = {"sweep.space": Path(args.space).name}
        options.epoch_lines = args.epoch_lines
        outcome = run_sweep(config, space, options)
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt as e:  # the sweep said how it stopped and how to go on
        return interrupts.exit_code(e)
    except WorkerFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\nParent run of the sweep: {outcome.parent_run_id}")
    uri = tracking.tracking_uri(config.run.tracking_uri)
    print(tracking.ui_hint(uri, outcome.experiment_id, outcome.parent_run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
