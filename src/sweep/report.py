"""What a sweep shows: a line per finished trial with the best value so far (also a metric of
the parent run, `sweep/best_<metric>`, one step per finished trial), and at the end the trials
table sorted by the objective, the best trial's config as a TOML file that runs as is, and
Optuna's optimization history and parameter importance plots, all artifacts of the parent run
under `sweep/`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import src.tracking as tracking
from src.config import to_toml
from src.sweep.study import ended
from src.sweep.trial import RUN_ID_ATTR, SweepPlan, child_name


def finished_trials(study: Any) -> list[Any]:
    """Complete, pruned and failed trials, in the order they ended; a trial stopped by a
    signal or by a silent heartbeat is left out (its retry takes its place)."""
    return ended(study)


def _better(a: float, b: float | None, direction: str) -> bool:
    return b is None or (a > b if direction == "maximize" else a < b)


def _values(t: Any) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Prints and logs (on the parent run) each trial as it ends, once."""

    def __init__(self, parent: Any, study: Any, plan: SweepPlan) -> None:
        self.parent, self.study, self.plan = parent, study, plan
        self.metric, self.direction = plan.space.metric, plan.space.direction
        self.seen = -1

    def update(self) -> None:
        trials = finished_trials(self.study)
        if len(trials) == self.seen:
            return
        self.seen = len(trials)
        key = f"sweep/best_{self.metric}"
        logged = set(self.parent.logged_steps(f"sweep/{self.metric}")) | set(
            self.parent.logged_steps(key)
        )
        best, best_number = None, None
        for step, t in enumerate(trials, 1):
            value = t.value if t.value is not None else _last_report(t)
            if t.state.name == "COMPLETE" and _better(t.value, best, self.direction):
                best, best_number = t.value, t.number
            if step in logged:
                continue
            metrics = {f"sweep/{self.metric}": value, key: best}
            self.parent.log_epoch({k: v for k, v in metrics.items() if v is not None}, step)
            shown = "-" if value is None else f"{value:.4f}"
            best_text = "" if best is None else f"  (best {best:.4f}, trial {best_number})"
            print(
                f"trial {t.number} {t.state.name.lower()}: {self.metric} {shown}  "
                f"{_values(t)}{best_text}",
                flush=True,
            )


def _last_report(t: Any) -> float | None:
    steps = t.intermediate_values
    return steps[max(steps)] if steps else None


def trials_table(study: Any, plan: SweepPlan) -> Any:
    """One row per finished trial, best first: number, state, objective, values, run id."""
    import pandas as pd

    rows = []
    for t in finished_trials(study):
        row = {"trial": t.number, "state": t.state.name, plan.space.metric: t.value}
        row.update(t.params)
        row["run_id"] = t.user_attrs.get(RUN_ID_ATTR, "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if rows:
        ascending = plan.space.direction == "minimize"
        table = table.sort_values(plan.space.metric, ascending=ascending, na_position="last")
    return table


def log_final(parent: Any, study: Any, plan: SweepPlan, folder: Path) -> Any:
    """The trials table, the best config and the plots, as files in `folder` and artifacts
    of the parent run; returns the table."""
    table = trials_table(study, plan)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "trials.csv", index=False)
    parent.log_artifact(folder / "trials.csv", "sweep")
    best = best_trial(study)
    if best is not None:
        path = folder / "best_config.toml"
        path.write_text(best_config_toml(best, plan))
        parent.log_artifact(path, "sweep")
        parent.set_tags(
            {
                "sweep.best_trial": best.number,
                f"sweep.best_{plan.space.metric}": best.value,
                "sweep.best_run_id": best.user_attrs.get(RUN_ID_ATTR, ""),
            }
        )
    for path in plot_study(study, plan, folder):
        parent.log_artifact(path, "sweep")
    return table


def best_trial(study: Any) -> Any:
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def best_config_toml(trial: Any, plan: SweepPlan) -> str:
    """The experiment with the best trial's values, as a TOML experiment file."""
    config = plan.config.replace(
        **{**trial.params, "run.run_name": child_name(plan, trial.number, trial.params)}
    )
    head = (
        f"# Best trial ({trial.number}) of the sweep {plan.study_name}: {plan.space.metric} "
        f"{trial.value:.4f} at its best epoch.\n"
        "# Train it: python -m src.run_experiment <this file>\n\n"
    )
    return head + to_toml(config)


def plot_study(study: Any, plan: SweepPlan, folder: Path) -> list[Path]:
    """Optuna's optimization history and, with two completed trials or more, the parameter
    importances, as PNGs in `folder`."""
    import warnings

    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ov

    from src.evaluate import pyplot, save_figure

    pyplot()  # the Agg backend before Optuna draws
    out = []
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = [("history.png", ov.plot_optimization_history)]
    if len(complete) >= 2 and len(plan.space.params) >= 1:
        plots.append(("importance.png", ov.plot_param_importances))
    for name, plot in plots:
        # Optuna's plots switch matplotlib to its ggplot style: for them only, not for the
        # plots this process draws next (a sweep of one worker trains in this process).
        with warnings.catch_warnings(), pyplot().rc_context():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            try:
                ax = plot(study, target_name=plan.space.metric)
            except (ValueError, RuntimeError) as e:  # e.g. every trial had the same value
                print(f"note: no {name} ({e}).")
                continue
            out.append(save_figure(ax.figure, folder / name))
    return out


def describe_best(study: Any, plan: SweepPlan) -> str:
    best = best_trial(study)
    if best is None:
        return "No trial completed."
    value = best.value if best.value is not None else math.nan
    return f"Best trial {best.number}: {plan.space.metric} {value:.4f}  {_values(best)}"


def cell_results(outcome: Any, cells: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The RunResult of each grid cell (name, values), in the order given; a cell without a
    completed trial gets an empty one."""
    import json

    from optuna.trial import TrialState

    from src.sweep.multirun import finished_result
    from src.train.experiment import RunResult

    def key(values: dict[str, Any]) -> str:
        return json.dumps(values, sort_keys=True)

    trials = outcome.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    run_of = {key(t.params): t.user_attrs.get(RUN_ID_ATTR) for t in trials}
    uri = tracking.tracking_uri(outcome.plan.config.run.tracking_uri)
    results = []
    for _, values in cells:
        run_id = run_of.get(key(values))
        results.append(
            finished_result(tracking.get_run(uri, run_id))
            if run_id
            else RunResult("", "", None, 0, {})
        )
    return results
