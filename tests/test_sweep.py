"""src.sweep: Optuna sweeps on TinyData with a real Optuna SQLite storage and MLflow store."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from src import config as cfg
from src.sweep.command import main
from tests.command_line import run_here
from tests.test_run_experiment import QUICK_END

REPO = Path(__file__).resolve().parent.parent
DEMO2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
FAST = ["--epochs", "1", "--max-batches", "2", "--device", "cpu", "--num-workers", "0"]
FAST += QUICK_END  # the trials' runs: no MLflow model, no heatmaps
LR_WD = """
metric = "val_auroc_mean"
sampler = { name = "random" }
pruner = "none"
[space]
"optimizer.lr" = { type = "float", low = 1e-4, high = 1e-1, log = true }
"optimizer.weight_decay" = { type = "categorical", choices = [1e-7, 1e-3] }
"""


def sweep_args(tmp_path: Path, uri: str, space: str = LR_WD, *more: str) -> list[str]:
    path = tmp_path / "space.sweep.toml"
    path.write_text(space)
    # --tracking-uri: every run of a process in this store, whatever a run does to the env.
    return [str(DEMO2), "--space", str(path), "--results-dir", str(tmp_path / "r"),
            "--tracking-uri", uri, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
            *FAST, *more]  # fmt: skip


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(ids, run_view_type=ViewType.ALL)) if ids else []


def split_runs(uri: str) -> tuple[list, list]:
    runs = all_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


LR = '"optimizer.lr" = { type = "float", low = 1e-4, high = 1e-1, log = true }'
BATCH = '"data.batch_size" = { type = "int", low = 8, high = 32, step = 8 }'


@pytest.mark.parametrize(
    "space, flags, message",
    [
        (LR_WD.replace('"optimizer.lr"', '"optimizer.learning_rate"'), [],
         "'optimizer.learning_rate' is not a key of the experiment's config"),
        (LR_WD.replace("low = 1e-4", "low = 0.5"), [], "has low = 0.5 >= high = 0.1"),
        (LR_WD.replace("low = 1e-4", "low = 0.1"), [], "has low = 0.1 >= high = 0.1"),
        (LR_WD.replace("low = 1e-4", "low = 0.0"), [],
         "'optimizer.lr' is log-scaled, so low must be above 0, got 0.0"),
        (LR_WD.replace("low = 1e-4", 'low = "1e-4"'), [],
         "'optimizer.lr' needs low and high, each a finite number, got low = '1e-4'"),
        (LR_WD.replace("high = 1e-1", "high = inf"), [], "each a finite number"),
        (LR_WD.replace("log = true", "step = 0"), [],
         "'optimizer.lr' has step = 0; step must be a finite number above 0"),
        (LR_WD.replace(LR, BATCH.replace("step = 8", "step = -8")), [],
         "'data.batch_size' has step = -8; step must be a whole number above 0"),
        (LR_WD.replace(LR, BATCH.replace("step = 8", "step = 2.5")), [],
         "'data.batch_size' has step = 2.5; step must be a whole number above 0"),
        (LR_WD.replace(LR, BATCH.replace("step = 8", "step = 25")), [],
         "'data.batch_size' has step = 25, larger than high - low = 24"),
        (LR_WD.replace("log = true", "step = 0.2"), [],
         "'optimizer.lr' has step = 0.2, larger than high - low = 0.0999"),
        (LR_WD.replace("log = true", "log = true, step = 0.01"), [],
         "'optimizer.lr' cannot be both log-scaled and stepped"),
        (LR_WD.replace("log = true", 'log = "yes"'), [], "'optimizer.lr' has log = 'yes'"),
        (LR_WD.replace("[1e-7, 1e-3]", "[]"), [],
         "'optimizer.weight_decay' needs choices = [at least two values]"),
        ('[space]\n"optimizer.lr" = []\n', [],
         "the values of 'optimizer.lr' must be a non-empty list"),
        (LR_WD.replace('"val_auroc_mean"', '"val_f1"'), [], "metric 'val_f1' is not one"),
        (LR_WD, ["--storage", "sqlite:////no/such/folder/optuna.db"],
         "The Optuna storage sqlite:////no/such/folder/optuna.db cannot be opened"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_before_any_run(
    mlflow_uri, tmp_path, capsys, space, flags, message
):
    assert main([*sweep_args(tmp_path, mlflow_uri, space, "--trials", "2"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert str(tmp_path / "space.sweep.toml") in err[0] or "--storage" in flags
    assert all_runs(mlflow_uri) == []
    assert not (tmp_path / "optuna.db").exists()  # no Optuna study either


def test_a_span_that_is_a_whole_number_of_steps_in_decimals_is_taken(tmp_path):
    """0.3 - 0.1 is 0.19999999999999998 in floats: a step of 0.2 still fits (two values)."""
    from src.sweep.space import space_from_dict

    config = cfg.load(DEMO2)
    spec = {"type": "float", "low": 0.1, "high": 0.3, "step": 0.2}
    space = space_from_dict({"space": {"optimizer.lr": spec}}, config, "here")
    assert space.params["optimizer.lr"] == spec


def test_one_line_per_trial_and_the_epoch_lines_with_epoch_lines(mlflow_uri, tmp_path, capsys):
    args = sweep_args(tmp_path, mlflow_uri, LR_WD, "--trials", "2")
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    (parent,), _ = split_runs(mlflow_uri)
    folder = (
        tmp_path / "r" / "Demo-2-TinyConv-TinyData" / "sweeps" / parent.data.tags["sweep.study"]
    )
    log = folder / "worker-0.log"
    # The header, a line per trial as it ends, then the table (its head and a row per trial).
    assert lines[0] == (
        f"2 trials, one at a time; each run's epoch lines: {log} (--epoch-lines prints them here)"
    )
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "trial 0 complete",
        "trial 1 complete",
        "",
    ]
    assert lines[4].split() == ["trial", "state", "val_auroc_mean", "optimizer.lr",
                                "optimizer.weight_decay", "run_id"]  # fmt: skip
    assert len([line for line in lines if line.startswith("trial ")]) == 2
    assert not [line for line in lines if line.startswith(("epoch ", "Device: ", "Run "))]
    # The runs' own lines are in the log: 2 trials x 2 epochs.
    logged = log.read_text().splitlines()
    assert len([line for line in logged if line.startswith("epoch ")]) == 4
    assert len([line for line in logged if line.startswith("Device: ")]) == 2

    # The same command after a finished sweep (--epoch-lines only changes what is printed): a
    # new study and parent (the code or the data may have changed), not "2 of 2 trials
    # counted" and the old results again.
    assert main([*args, "--epoch-lines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # Each trial's two epoch lines, then its own line.
    shown = [line.split()[:2] for line in lines if line.startswith(("epoch ", "trial "))]
    assert [words[1] for words in shown] == ["1/2", "2/2", "0", "1/2", "2/2", "1"]
    assert not any("one at a time" in line for line in lines)
    parents, children = split_runs(mlflow_uri)
    assert len(parents) == 2 and len(children) == 4
    (again,) = [p for p in parents if p.info.run_id != parent.info.run_id]
    assert again.data.tags["sweep.study"] == parent.data.tags["sweep.study"] + "-2"
    assert again.info.status == "FINISHED"


@pytest.mark.slow
def test_six_trials_on_two_workers_one_parent_and_compare_runs_shows_them(
    mlflow_uri, tmp_path, capsys
):
    assert main([*sweep_args(tmp_path, mlflow_uri), "--trials", "6", "--workers", "2"]) == 0
    (parent,), children = split_runs(mlflow_uri)
    assert parent.info.status == "FINISHED" and len(children) == 6
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["sweep.status"] for c in children} == {"complete"}
    study = optuna.load_study(
        study_name=parent.data.tags["sweep.study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    trials = {t.number: t for t in study.trials}
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == list(range(6))
    for c in children:  # the run's params are the values its trial drew
        t = trials[int(c.data.tags["optuna.trial_number"])]
        assert float(c.data.params["optimizer.lr"]) == t.params["optimizer.lr"]
        assert float(c.data.params["optimizer.weight_decay"]) == t.params["optimizer.weight_decay"]
        assert c.data.metrics["best_val_auroc_mean"] == t.value
    # Both workers ran trials, each as its own process.
    assert len({t.user_attrs["sweep.worker"] for t in study.trials}) == 2

    # Best so far, one step per finished trial: the running maximum of the trials' values.
    client = MlflowClient(mlflow_uri)
    history = client.get_metric_history(parent.info.run_id, "sweep/best_val_auroc_mean")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert values == sorted(values) and values[-1] == study.best_value
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    expected = ("trials.csv", "best_config.toml", "history.png", "importance.png")
    assert names == {f"sweep/{n}" for n in expected}
    best = tmp_path / "best.toml"
    best.write_text(Path(client.download_artifacts(parent.info.run_id, "sweep/best_config.toml",
                                                   str(tmp_path))).read_text())  # fmt: skip
    config = cfg.load(best)  # runs as is: a full experiment file with the best values
    assert config.optimizer.lr == study.best_params["optimizer.lr"]

    from src.tools.compare_runs import main as compare

    capsys.readouterr()
    out_dir = tmp_path / "compare"
    assert compare(["--sweep", parent.info.run_id, "--out", str(out_dir)]) == 0
    with open(out_dir / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    shown = [float(r["best_val_auroc_mean"]) for r in rows]
    assert shown == sorted((t.value for t in study.trials), reverse=True)
    assert list(rows[0])[:6] == ["trial", "run_name", "run_id", "status", "optimizer.lr",
                                 "optimizer.weight_decay"]  # fmt: skip
    assert float(rows[0]["optimizer.lr"]) == study.best_params["optimizer.lr"]


@pytest.mark.slow
def test_sigkill_mid_trial_then_two_processes_finish_the_same_study(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """Two sweep processes on one study at once: a process of its own, and then the same
    command in this one. The first is killed (SIGKILL) in the middle of a trial while this
    one runs its own; this one finishes the study: the killed trial's heartbeat goes silent,
    Optuna fails it after the grace period (a few seconds here), and it is retried with its
    values; the retry resumes the killed trial's MLflow run."""
    monkeypatch.setenv("SWEEP_HEARTBEAT_S", "1")  # both processes: a silent trial fails in 3 s
    monkeypatch.setenv("SWEEP_GRACE_S", "3")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [*sweep_args(tmp_path, mlflow_uri), "--trials", "4", "--study-name", "s"]
    args[args.index("--epochs") + 1] = str(TRIAL_EPOCHS)
    args[args.index("--max-batches") + 1] = "0"  # whole epochs of a slow dataset: a second or
    args += ["--set", 'data.dataset="tests.faulty_data:SlowTinyData"']  # so each, mostly asleep
    args += ["--set", "data.args.delay_s=0.002"]
    cmd = [sys.executable, "-m", "src.sweep", *args]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, killed = MlflowClient(mlflow_uri), []
    ours = f"{socket.gethostname()}:{os.getpid()}"  # this process's trials (src/sweep/study.py)

    def kill_first_while_both_run() -> None:
        trial = wait_for_a_trial_mid_run(storage, client, first, tmp_path / "r", also_by=ours)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed.append(trial)

    try:
        wait_for_a_trial_mid_run(storage, client, first, tmp_path / "r")  # study and parent exist
        killer = threading.Thread(target=kill_first_while_both_run)
        killer.start()
        here = run_here(["-m", "src.sweep", *args], REPO, capsys, monkeypatch)
        killer.join()
    finally:
        if first.poll() is None:
            first.kill()
    assert here.returncode == 0, here.stdout + here.stderr
    assert "Going on with s" in here.stdout and len(killed) == 1

    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 4 and states.count("FAIL") == 1  # the killed one
    # Each trial drew its own values (the retry has the killed one's, as it should): the
    # second process did not draw again what the first drew with the same seed.
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len({t.params["optimizer.lr"] for t in complete}) == 4, [t.params for t in complete]
    assert {t.user_attrs["sweep.worker"] for t in study.trials} == {
        f"{socket.gethostname()}:{first.pid}",
        ours,
    }
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") is not None)
    assert retry.system_attrs["failed_trial"] == killed[0].number
    assert retry.state.name == "COMPLETE"
    assert retry.user_attrs["sweep.worker"] == ours  # this process took the retry
    assert study.user_attrs["sweep.finished"] is True
    (parent,), children = split_runs(mlflow_uri)
    assert parent.info.status == "FINISHED"
    # Four runs: the killed trial's run was resumed by its retry, not started again.
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    resumed = next(c for c in children if c.info.run_id == retry.user_attrs["mlflow.run_id"])
    assert resumed.data.tags["optuna.trial_number"] == str(retry.number)
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3]  # some before the kill, the others after it


# The trials' epochs: 3, so that a trial can be caught after its first epoch and before its
# last (5 epochs: 59.5 s and 33.4 s of CPU on a loaded machine; 3 epochs: 47.7 s and 29.9 s).
# The four trials keep this process's trials running while the first process is caught.
TRIAL_EPOCHS = 3


def wait_for_a_trial_mid_run(
    storage: str, client: MlflowClient, proc, results: Path, also_by: str = ""
) -> optuna.trial.FrozenTrial:
    """A trial of `proc` whose last.pt holds epoch 1 to TRIAL_EPOCHS - 1 (at a moment when a
    trial of the worker `also_by` runs too, when given)."""
    owner = f"{socket.gethostname()}:{proc.pid}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.05)
        try:
            study = optuna.load_study(study_name="s", storage=storage)
        except KeyError:
            continue
        running = [t for t in study.trials if t.state.name == "RUNNING"]
        if also_by and not any(t.user_attrs.get("sweep.worker") == also_by for t in running):
            continue
        for trial in (t for t in running if t.user_attrs.get("sweep.worker") == owner):
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()],
                f"tags.`optuna.trial_number` = '{trial.number}'",
            )
            for last in results.glob(f"*/{runs[0].info.run_id}/last.pt" if runs else "-"):
                try:
                    if 1 <= torch.load(last, weights_only=True)["epoch"] < TRIAL_EPOCHS:
                        return trial
                except Exception:  # being replaced right now
                    pass
    raise AssertionError("no trial of the first process was caught mid-run in time")


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("SWEEP_GRACE_S", "soon", "SWEEP_GRACE_S must be a whole number of seconds above 0, "
         "got 'soon'."),
        ("SWEEP_HEARTBEAT_S", "0", "SWEEP_HEARTBEAT_S must be a whole number of seconds above 0"),
        ("SWEEP_HEARTBEAT_S", "200", "SWEEP_GRACE_S (120) must be longer than SWEEP_HEARTBEAT_S "
         "(200)"),
    ],
)  # fmt: skip
def test_a_bad_heartbeat_setting_is_one_line_before_any_run(
    mlflow_uri, tmp_path, capsys, monkeypatch, name, value, message
):
    monkeypatch.setenv(name, value)
    assert main(sweep_args(tmp_path, mlflow_uri, LR_WD, "--trials", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert all_runs(mlflow_uri) == []
    assert not (tmp_path / "optuna.db").exists()


def test_a_pruner_stops_trials_after_an_epoch_and_tags_their_runs(mlflow_uri, tmp_path):
    # AUROC is at most 1: a threshold of 2 prunes every trial once its warm-up epoch is over.
    space = LR_WD.replace('pruner = "none"', 'pruner = { name = "threshold", lower = 2.0, '
                          "n_warmup_steps = 2 }")  # fmt: skip
    args = sweep_args(tmp_path, mlflow_uri, space, "--trials", "2")
    args[args.index("--epochs") + 1] = "3"
    assert main(args) == 0
    (parent,), children = split_runs(mlflow_uri)
    assert parent.info.status == "FINISHED" and len(children) == 2
    client = MlflowClient(mlflow_uri)
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["sweep.status"] == "pruned"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_loss")]
        assert sorted(steps) == [1, 2]  # stopped after epoch 2 of 3
        folder = tmp_path / "r" / "Demo-2-TinyConv-TinyData" / c.info.run_id
        assert (folder / "best.pt").is_file()  # its checkpoints are kept
    study = optuna.load_study(
        study_name=parent.data.tags["sweep.study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    # No trial completed: no best config, no importance plot; the history still shows them.
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert names == {"sweep/trials.csv", "sweep/history.png"}
