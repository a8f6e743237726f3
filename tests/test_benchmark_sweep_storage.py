"""benchmarks.sweep_storage's pieces (a whole run trains sweeps for minutes and is not run
here): its arguments, the sweep command of a case, and the trials it counts in a storage."""

from __future__ import annotations

import optuna
import pytest

import benchmarks.sweep_storage as bench


def test_arguments_default_to_six_trials_one_and_two_workers_both_storages(capsys):
    args = bench.parse_args([])
    assert (args.trials, args.workers, args.storage) == (6, [1, 2], ["sqlite", "postgresql"])
    args = bench.parse_args(["--trials", "2", "--workers", "1", "--storage", "postgresql"])
    assert (args.trials, args.workers, args.storage) == (2, [1], ["postgresql"])
    for bad in (["--trials", "0"], ["--workers", "1", "0"], ["--storage", "mysql"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(bad)
        assert info.value.code == 2
    assert "--trials must be at least 1" in capsys.readouterr().err


def test_a_case_is_the_readme_sweep_with_its_stores_in_the_case_folder(tmp_path):
    cmd = bench.sweep_command(6, 2, tmp_path, None)
    assert cmd[1:5] == ["-m", "src.sweep", str(bench.CONFIG), "--space"]
    assert bench.CONFIG.is_file() and bench.SPACE.is_file()
    assert cmd[4:] == [
        "--space",
        str(bench.SPACE),
        "--trials",
        "6",
        "--epochs",
        "2",
        "--workers",
        "2",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--results-dir",
        str(tmp_path / "results"),
    ]  # no --storage: the sweep's default, optuna.db next to mlflow.db
    uri = "postgresql+psycopg://postgres@127.0.0.1:5432/optuna_w2"
    assert bench.sweep_command(6, 2, tmp_path, uri)[-2:] == ["--storage", uri]
    assert bench.per_minute(6, 30.0) == 12.0


def test_trials_counted_are_those_that_ended(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=storage)
    states = [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    states += [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]
    for state in states:
        trial = study.ask()
        if state == optuna.trial.TrialState.RUNNING:
            continue
        study.tell(trial, 1.0 if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    assert bench.trials_in(storage) == 3  # the running trial is not counted
