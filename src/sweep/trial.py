"""The trials of a sweep: one worker's loop and one trial, which is one child run of the sweep.

A worker (the sweep's own process with `--workers 1`, else `python -m src.sweep.trial PLAN`)
takes trials from the study until --trials of them count (src/sweep/study.py). A trial is
`src.train.experiment.run` of the base config with the trial's values, a child MLflow run of the
sweep's parent tagged with the Optuna trial number; its objective is the metric at the run's
best epoch. With a pruner, every epoch's value of the metric is reported to Optuna: a trial
the pruner stops ends after that epoch like an early-stopped run (best weights evaluated,
checkpoints kept, FINISHED) and is tagged `sweep.status = pruned`. A retried trial resumes
the MLflow run of the trial it retries from that run's last.pt.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import src.interrupts as interrupts
import src.sweep.study as sweep_study
import src.tracking as tracking
from src.config import ExperimentConfig, from_dict
from src.errors import NonFiniteLossError, UserError, print_user_error
from src.sweep.space import SweepSpace, make_pruner, make_sampler, space_from_dict, suggest

RUN_ID_ATTR = "mlflow.run_id"
WAIT_POLL_S = 1.0  # how often a worker with no trial to take looks at the running ones
STATUS_TAG = "sweep.status"


@dataclass
class SweepPlan:
    """Everything a worker needs, written as JSON for worker processes."""

    config: ExperimentConfig
    space: SweepSpace
    storage_url: str
    study_name: str
    parent_run_id: str
    trials: int
    child_names: str = "trial"  # "trial": <run name>-trial<N>; "values": the values, '-'-joined
    process: str = ""  # the sweep process's random id, stamped on its trials (PROCESS_ATTR)

    def to_json(self) -> str:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["config"] = self.config.to_dict()
        data["space"] = self.space.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> SweepPlan:
        data = json.loads(text)
        data["config"] = from_dict(data["config"])
        data["space"] = space_from_dict(data["space"], data["config"], "The sweep's space")
        return cls(**data)


def child_name(plan: SweepPlan, number: int, values: dict[str, Any]) -> str:
    if plan.child_names == "values":
        return "-".join(str(values[k]) for k in plan.space.params)
    return f"{plan.config.run.run_name}-trial{number}"


def load_study(plan: SweepPlan) -> tuple[Any, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the sweep prints its own lines
    storage = sweep_study.open_storage(plan.storage_url)
    study = optuna.load_study(
        study_name=plan.study_name,
        storage=storage,
        sampler=make_sampler(plan.space, plan.config.run.seed),
        pruner=make_pruner(plan.space),
    )
    return study, storage


def next_sampler(plan: SweepPlan, study: Any) -> Any:
    """The sampler that draws the next trial (called under the machine lock). A search's is
    seeded with its seed plus the number of trials the study holds, a number no other trial
    of this machine drew with: a sweep that goes on after a stop and a second worker do not
    draw again the values of the trials before them (one seed for all gave a resumed sweep the
    killed trial's values twice), and the same history gives the same draws. (Two machines
    that start a trial at the same moment can draw with the same seed.)
    A grid's sampler keeps its one seed (it orders the cells, and every worker must agree on
    that order), and so does QMC's (its sequence is indexed by the trial's number)."""
    if plan.space.is_grid or plan.space.sampler["name"] in ("grid", "qmc"):
        return study.sampler
    return make_sampler(
        plan.space, plan.config.run.seed, offset=len(study.get_trials(deepcopy=False))
    )


def work(
    plan: SweepPlan,
    parent_pid: int | None = None,
    after_trial: Any = None,
    output: TextIO | None = None,
) -> None:
    """Run trials until the study has --trials that count, then wait while trials of other
    workers run, for at most the heartbeat's grace period and two beats: one whose worker
    died is failed and retried meanwhile (its retry taken here), one still running after that
    has a live worker, which ends it. `after_trial()` after each trial.
    A worker whose sweep process died (`parent_pid` no longer its parent) takes no more.
    `output`: where the trials' runs print their lines (device, every epoch); default stdout."""
    study, _ = load_study(plan)
    beat, grace = sweep_study.heartbeat()
    waited_since = None
    while parent_pid is None or os.getppid() == parent_pid:
        with sweep_study.MachineLock(plan.storage_url, plan.study_name) as lock:
            sweep_study.fail_stale(study)
            if sweep_study.counted(study) >= plan.trials:
                if not _running(study):
                    return
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > grace + 2 * beat:
                    return
                lock.release()
                time.sleep(WAIT_POLL_S)
                continue
            waited_since = None
            study.sampler = next_sampler(plan, study)
            with redirect_stdout(output) if output is not None else nullcontext():
                study.optimize(
                    lambda trial: objective(trial, plan, lock),
                    n_trials=1,
                    catch=(NonFiniteLossError,),  # a diverging trial fails; the sweep goes on
                )
        if after_trial is not None:
            after_trial()


def _running(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def objective(trial: Any, plan: SweepPlan, lock: sweep_study.MachineLock) -> float:
    """One trial: its values drawn, its run trained; the metric at the best epoch."""
    import optuna

    trial.set_user_attr(sweep_study.WORKER_ATTR, sweep_study.worker_id())
    trial.set_user_attr(sweep_study.PROCESS_ATTR, plan.process)
    trial.set_user_attr(sweep_study.STOPPED_ATTR, False)
    values = suggest(trial, plan.space)
    lock.release()  # the trial is in the storage: other workers may count it and go on
    # A retry keeps the name of the trial it retries: it resumes that trial's run.
    first = _frozen(trial).system_attrs.get("failed_trial", trial.number)
    child = plan.config.replace(**{"run.run_name": child_name(plan, first, values), **values})
    report = EpochReport(trial, plan.space.metric)
    try:
        result = run_trial(child, trial, plan, report)
    except KeyboardInterrupt:
        # Retried when the sweep goes on: the retry is enqueued now, by the one process that
        # knows the trial stopped (Optuna then marks the trial failed).
        sweep_study.retry_callback()(trial.study, _frozen(trial))
        trial.set_user_attr(sweep_study.STOPPED_ATTR, True)
        raise
    trial.set_user_attr(RUN_ID_ATTR, result.run_id)
    status = "pruned" if report.pruned else "complete"
    set_run_tags(child, result.run_id, {STATUS_TAG: status})
    if report.pruned:
        raise optuna.TrialPruned(f"pruned after epoch {report.last_epoch}")
    return result.best_metrics.get(f"best_{plan.space.metric}", math.nan)


class EpochReport:
    """The `on_epoch` callback of a run: reports the metric to Optuna, says when to stop."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned, self.last_epoch = False, 0

    def __call__(self, epoch: int, metrics: dict[str, float]) -> bool:
        value = metrics.get(self.metric)
        self.last_epoch = epoch
        if value is None or math.isnan(value):
            return False
        self.trial.report(float(value), epoch)
        self.pruned = self.trial.should_prune()
        return self.pruned


def run_trial(child: ExperimentConfig, trial: Any, plan: SweepPlan, report: EpochReport) -> Any:
    """The trial's run: the run of the trial it retries, resumed from its last.pt when there
    is one, else a new child run of the sweep's parent."""
    from src.train.experiment import results_dir, run

    tags = {"optuna.trial_number": trial.number, "optuna.study": plan.study_name}
    hook = {"on_epoch": report} if plan.space.pruner["name"] != "none" else {}
    before = retried_run(child, trial, plan)
    if before is not None:
        folder = results_dir(child, before.info.run_id)
        if (folder / "last.pt").is_file():
            set_run_tags(child, before.info.run_id, tags)
            print(f"Trial {trial.number}: resuming run {before.info.run_id} from {folder}.")
            return run(child, resume=folder, parent_run_id=plan.parent_run_id, **hook)
        if before.info.status == "RUNNING":  # its process died before its first epoch ended
            tracking.Store(_uri(child)).set_terminated(before.info.run_id, "KILLED")
    return run(child, parent_run_id=plan.parent_run_id, extra_tags=tags, **hook)


def retried_run(child: ExperimentConfig, trial: Any, plan: SweepPlan) -> Any:
    """The MLflow run of the trial that `trial` retries (the last of its retries), or None."""
    history = _frozen(trial).system_attrs.get("retry_history", [])
    if not history:
        return None
    retried = f"tags.`optuna.trial_number` = '{history[-1]}'"
    runs = tracking.child_runs(_uri(child), plan.parent_run_id, retried, newest_first=True, limit=1)
    return runs[0] if runs else None


def _uri(config: ExperimentConfig) -> str:
    return tracking.tracking_uri(config.run.tracking_uri)


def _frozen(trial: Any) -> Any:
    """The stored record of a running trial (its system attributes: what it retries)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def set_run_tags(config: ExperimentConfig, run_id: str, tags: dict[str, Any]) -> None:
    store = tracking.Store(_uri(config))
    for key, value in tags.items():
        store.set_tag(run_id, key, value)


def main(argv: list[str] | None = None) -> int:
    """`python -m src.sweep.trial PLAN.json`: one worker process of a sweep."""
    (plan_path,) = (argv or sys.argv[1:])[:1]
    plan = SweepPlan.from_json(Path(plan_path).read_text())
    try:
        with interrupts.held():  # SIGTERM too ends the running trial KILLED, not cut short
            work(plan, parent_pid=os.getppid())
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt as e:
        return interrupts.exit_code(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
