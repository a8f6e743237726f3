"""What clusters and teams do to runs: SIGTERM to a group of runs, the same run resumed twice
at once, several runs starting together on a new SQLite store."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.pausing import PAUSE_AT, wait_until_paused
from tests.test_resilience import DEMO, PAUSING, runs_of
from tests.test_run_experiment import DEMO2, QUICK_END, REPO

pytestmark = pytest.mark.slow  # real processes and real signals

SLOW_TINY = ["--set", 'data.dataset="tests.faulty_data:SlowTinyData"']
SLOW_TINY += ["--set", "data.args.delay_s=0.004"]  # an epoch takes ~0.8 s
SLOW_TINY += [*QUICK_END, *PAUSING]  # a model that holds still where the test says (PAUSE_AT)


def in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """Demo-2's command line in this process (`src.cli.main`): exit code, stdout, stderr."""
    from src.cli import main

    capsys.readouterr()
    code = main(args, default_config=str(DEMO2))
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(condition, proc: subprocess.Popen, what: str, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{what}: not within {limit_s} s\n{out}\n{err}")
        time.sleep(0.02)


def test_seeds_stopped_by_sigterm_go_on_with_the_same_command(mlflow_uri, tmp_path, capsys):
    """SIGTERM in the second of two seeds: the parent and that child end KILLED, the hint is
    the same command, and that command finishes the group: the finished child is skipped, the
    stopped one resumes from its last.pt, the same parent closes (no new runs)."""
    results = tmp_path / "results"
    args = ["--seeds", "0", "1", "--epochs", "2", "--experiment-name", "seeds-stop"]
    args += [*SLOW_TINY, "--results-dir", str(results)]
    proc = subprocess.Popen(
        [sys.executable, DEMO, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # Step 4 of the second seed's epoch 2: 2 epochs of 9 steps for seed 0, then 9 + 4.
        env={**os.environ, PAUSE_AT: "31"},
    )
    wait_until_paused(proc)
    wait_for(lambda: len(list(results.glob("*/*/last.pt"))) == 2, proc, "second seed's epoch 1")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    command = f"python {shlex.join([DEMO, *args])}"
    assert f"(finished runs are skipped, the stopped one resumes): {command}\n" in err, err
    stopped = {r.info.run_name: r for r in runs_of(mlflow_uri, "seeds-stop")}
    assert {n: r.info.status for n, r in stopped.items()} == {
        "tinyconv-seeds": "KILLED",
        "tinyconv-seed0": "FINISHED",
        "tinyconv-seed1": "KILLED",
    }

    code, out, err = in_process(args, capsys)
    assert code == 0, err
    assert "tinyconv-seed0: finished before" in out
    assert "tinyconv-seed1: resuming run" in out
    after = {r.info.run_name: r for r in runs_of(mlflow_uri, "seeds-stop")}
    assert {n: r.info.run_id for n, r in after.items()} == {
        n: r.info.run_id for n, r in stopped.items()
    }
    assert {r.info.status for r in after.values()} == {"FINISHED"}
    client = MlflowClient(mlflow_uri)
    seed1 = after["tinyconv-seed1"].info.run_id
    assert [m.step for m in client.get_metric_history(seed1, "val_loss")] == [1, 2]
    assert "best_val_auroc_mean.mean" in after["tinyconv-seeds"].data.metrics


def test_the_same_run_resumed_twice_at_once_is_refused_the_second_time(
    mlflow_uri, tmp_path, capsys
):
    results = tmp_path / "results"
    base = ["--experiment-name", "twice", *SLOW_TINY, "--results-dir", str(results)]
    code, _, err = in_process([*base, "--epochs", "1"], capsys)
    assert code == 0, err
    (folder,) = {p.parent for p in results.glob("*/*/last.pt")}
    proc = subprocess.Popen(
        [sys.executable, DEMO, *base, "--epochs", "60", "--resume", str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env={**os.environ, PAUSE_AT: "1"},  # it holds the run's folder until it is killed
    )
    try:
        lock = folder / ".lock"
        holds = f"process {proc.pid} "
        wait_until_paused(proc)
        wait_for(lambda: lock.is_file() and holds in lock.read_text(), proc, "the first resume")
        code, out, err = in_process([*base, "--epochs", "60", "--resume", str(folder)], capsys)
        assert proc.poll() is None  # the first one still trains
    finally:
        proc.kill()
        proc.communicate()
    assert code == 2, out + err
    assert err.strip() == (
        f"error: The run in {folder} is in use by {lock.read_text().strip()}; wait for it to "
        "end (or stop it) before resuming it."
    )
    (r,) = runs_of(mlflow_uri, "twice")
    steps = [m.step for m in MlflowClient(mlflow_uri).get_metric_history(r.info.run_id, "val_loss")]
    assert steps == sorted(set(steps))  # no epoch logged twice


START_A_RUN = """
import sys
import src.tracking as tracking
tracking.start(tracking.tracking_uri(), "together", sys.argv[2], {}).end("FINISHED")
"""


def test_four_runs_started_at_once_on_a_new_sqlite_store(tmp_path, monkeypatch):
    """A job array: four processes open a store that does not exist yet, at the same moment;
    MLflow's table creation crashed three of them ("table ... already exists")."""
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_A_RUN, str(DEMO2), f"run{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(4)
    ]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [code for code, _ in outcomes] == [0, 0, 0, 0], [err[-600:] for _, err in outcomes]
    names = sorted(r.info.run_name for r in runs_of(uri, "together"))
    assert names == ["run0", "run1", "run2", "run3"]
    assert Path(tmp_path / "new" / "mlflow.db").is_file()
