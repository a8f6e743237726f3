"""The paths of several machines, on one machine, against a real PostgreSQL
(benchmarks/postgres_server.py): a team MLflow server on PostgreSQL that two training processes log
to at once, one of them killed and resumed into the same run; and one sweep that two machines
share through one Optuna study in PostgreSQL. Each "machine" is a process with its own working
folder, results folder and TMPDIR (where a machine keeps its own sweep lock)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from benchmarks.postgres_server import PostgresServer
from load_dataset.custom_tiny import TinyData
from load_dataset.errors import DataError
from tests.command_line import run_here
from tests.mlflow_server import MlflowServer
from tests.pausing import PAUSE_AT, RELEASE, wait_until_paused
from tests.test_resilience import DEMO, PAUSING, runs_of, wait_for_epoch
from tests.test_run_experiment import QUICK_END, REPO

pytestmark = pytest.mark.slow  # a PostgreSQL server, an MLflow server, training processes

DEMO2_TOML = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
LR_WD = REPO / "experiments" / "demo2_lr_wd.sweep.toml"
GATE_TIMEOUT_S = 300.0


class GatedTinyData(TinyData):
    """TinyData whose training split waits, when it is built, until `parties` processes have
    built theirs (a file per process in `gate_dir`): two machines then train at the same
    time, whichever started first. Later builds (the next trials, a resumed run) pass at once;
    `delay_s` per training sample keeps an epoch long enough to stop a run in it."""

    def __init__(
        self, setname: str, gate_dir: str, parties: int = 2, delay_s: float = 0.0, **kwargs
    ) -> None:
        super().__init__(setname, **kwargs)
        self.delay_s = delay_s if setname == "train" else 0.0
        if setname != "train":
            return
        gate = Path(gate_dir)
        (gate / str(os.getpid())).touch()
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while len(list(gate.iterdir())) < parties:
            if time.monotonic() > deadline:
                raise DataError(f"{gate}: the other machine did not start within the limit.")
            time.sleep(0.05)

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay_s)
        return super().__getitem__(i)


def gated(gate: Path, delay_s: float = 0.0) -> list[str]:
    gate.mkdir(parents=True, exist_ok=True)
    flags = ["--set", 'data.dataset="tests.test_postgres:GatedTinyData"']
    flags += ["--set", f'data.args.gate_dir="{gate}"', "--set", f"data.args.delay_s={delay_s}"]
    return flags + ["--num-workers", "0"]


@pytest.fixture(scope="module")
def postgres():
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def team(postgres: PostgresServer, tmp_path: Path):
    # The names the machines call it by: the README's mlflow-host.
    hosts = "mlflow-host:*,localhost:*,127.0.0.1:*"
    server = MlflowServer(postgres.create_database("mlflow"), tmp_path, hosts)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_the_server_is_postgresql_run_by_an_account_that_is_not_root(postgres):
    """What the other tests stand on: PostgreSQL itself, reached through psycopg 3, serving on
    127.0.0.1, its processes owned by the fixture's account (root cannot run it)."""
    with psycopg.connect(postgres.uri("postgres", driver=None)) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        address = conn.execute("SELECT inet_server_addr()::text").fetchone()[0]
    assert int(version) >= 160000
    assert address == "127.0.0.1/32"
    uid = os.stat(f"/proc/{postgres.proc.pid}").st_uid
    assert uid == (postgres.account.pw_uid if postgres.account else os.getuid())
    assert uid != 0


def test_a_team_server_on_postgresql_for_two_machines_training_and_one_sweep(
    team: MlflowServer, postgres: PostgresServer, tmp_path: Path, capsys, monkeypatch
):
    """Two checks on one server (starting one takes 10-25 s of CPU). The server answers a
    machine that calls it by its name (the README's `--allowed-hosts`)."""
    request = urllib.request.Request(
        f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1",
        headers={"Host": "mlflow-host:5000"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200
    check_two_machines_train_at_once_and_one_resumes_after_sigkill(
        team, tmp_path / "training", capsys, monkeypatch
    )
    check_one_sweep_on_two_machines_in_one_postgresql_study(
        team, postgres, tmp_path / "sweep", capsys, monkeypatch
    )


def start_machine_b(argv: list[str], b: Path, env: dict[str, str]) -> subprocess.Popen:
    """`python ARGV` as machine B: in its folder `b`, with `env` added, its output piped."""
    return subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=b,
        env={**os.environ, **env},
    )


def check_two_machines_train_at_once_and_one_resumes_after_sigkill(
    team: MlflowServer, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Machines A (this process) and B (a process of its own) train at the same time, logging
    to the team server; B is killed (SIGKILL: a machine that died) in its second epoch, once
    its first is saved, which leaves its run RUNNING, and `--resume` on B's results folder ends
    that same run FINISHED with every epoch logged once, through a restart of the server in
    the middle of it. The artifacts of both are in the server's folder."""
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    a.mkdir(parents=True)
    b.mkdir()
    args = [*QUICK_END, "--experiment-name", "team", *gated(tmp_path / "gate"), *PAUSING]
    client = MlflowClient(team.uri)
    b_args = [DEMO, *args, "--run-name", "b", "--epochs", "2", "--results-dir", str(b / "results")]
    # B holds still at the first step of its second epoch (9 steps an epoch) until killed.
    proc_b = start_machine_b(b_args, b, {"MLFLOW_TRACKING_URI": team.uri, PAUSE_AT: "10"})
    stopped: dict = {}

    def kill_b_after_its_first_epoch() -> None:
        try:
            wait_until_paused(proc_b, limit_s=GATE_TIMEOUT_S)
            stopped["run"] = wait_for_epoch(b / "results", 1, proc_b, limit_s=GATE_TIMEOUT_S)
        finally:
            proc_b.kill()

    killer = threading.Thread(target=kill_b_after_its_first_epoch)
    killer.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.uri)
    try:
        a_args = [DEMO, *args, "--run-name", "a", "--epochs", "1"]
        result_a = run_here([*a_args, "--results-dir", str(a / "results")], a, capsys, monkeypatch)
    finally:
        killer.join()
        proc_b.wait()
    assert result_a.returncode == 0, result_a.stderr
    run_b = stopped["run"]
    assert client.get_run(run_b.name).info.status == "RUNNING"  # what a SIGKILL leaves

    resume_b_through_a_server_restart(team, [*b_args, "--resume", str(run_b)], b)
    runs = {r.info.run_name: r for r in runs_of(team.uri, "team")}
    assert sorted(runs) == ["a", "b"]  # the resumed run is B's, not a new one
    assert runs["b"].info.run_id == run_b.name
    for name, epochs in (("a", 1), ("b", 2)):
        run_id = runs[name].info.run_id
        assert runs[name].info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
        assert sorted(steps) == list(range(1, epochs + 1)), (name, steps)
        # The artifacts went through the server into its folder, none to a machine's.
        stored = list(team.artifacts.rglob(f"{run_id}/artifacts/config/config.toml"))
        assert len(stored) == 1, list(team.artifacts.rglob("*"))
    assert not list(a.rglob("mlruns")) and not list(b.rglob("mlruns"))


def resume_b_through_a_server_restart(team: MlflowServer, argv: list[str], b: Path) -> None:
    """B goes on (`--resume`) while the server restarts, as the outage test of a SQLite-backed
    server has it: B holds still at its first step until the server is down, then trains its
    epoch, whose metrics the server cannot take, and the server comes back (the same command,
    the same database) while B goes on; B ends with exit code 0."""
    release = b / "release"
    env = {"MLFLOW_TRACKING_URI": team.uri, PAUSE_AT: "1", RELEASE: str(release)}
    proc = start_machine_b(argv, b, env)
    try:
        wait_until_paused(proc, limit_s=GATE_TIMEOUT_S)
        team.stop(signal.SIGTERM)
        release.touch()
        lines = []
        for line in proc.stdout:  # the epoch's line: its metrics went to the server, down
            lines.append(line)
            if line.startswith("epoch   2/2"):
                break
        team.start()
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(lines) + out + err[-3000:]


def check_one_sweep_on_two_machines_in_one_postgresql_study(
    team: MlflowServer, postgres: PostgresServer, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The README's sweep across machines: the same command on two machines (this process
    and another), one `--storage postgresql+psycopg://...` and `--study-name`. Each trial
    number runs once, as one child run of one parent run; both machines take trials; the
    study ends with --trials trials, or one more: each machine's lock is its own, so both may
    count 1 of 2 and start one at the same moment (at most one extra per other machine). Each
    machine's first trial waits for the other's (the gate): both take one."""
    storage = postgres.create_database("optuna")
    trials = 2
    args = ["-m", "src.sweep", str(DEMO2_TOML), "--space", str(LR_WD), "--trials", str(trials)]
    args += ["--epochs", "1", *QUICK_END, *gated(tmp_path / "gate")]
    args += ["--tracking-uri", team.uri, "--storage", storage, "--study-name", "two-machines"]
    args += ["--experiment-name", "team-sweep"]
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    for folder in (a, b):
        (folder / "tmp").mkdir(parents=True)
    proc_b = subprocess.Popen(
        [sys.executable, *args, "--results-dir", str(b / "results")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,  # each machine's checkout (`python -m src.sweep` runs in its root)
        env={**os.environ, "TMPDIR": str(b / "tmp")},
    )
    try:
        monkeypatch.setenv("TMPDIR", str(a / "tmp"))
        result_a = run_here([*args, "--results-dir", str(a / "results")], REPO, capsys, monkeypatch)
    finally:
        out_b, err_b = proc_b.communicate(timeout=600)
    assert result_a.returncode == 0, (result_a.stderr, out_b, err_b)
    assert proc_b.returncode == 0, err_b
    joined = [out for out in (result_a.stdout, out_b) if "Going on with two-machines (" in out]
    assert len(joined) == 1, (result_a.stdout, out_b)  # one created the study, one joined it

    study = optuna.load_study(study_name="two-machines", storage=storage)
    done = study.get_trials(deepcopy=False)
    assert trials <= len(done) <= trials + 1
    states = {t.state for t in done}
    assert states <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    workers = {t.user_attrs["sweep.worker"].rpartition(":")[2] for t in done}
    assert workers == {str(os.getpid()), str(proc_b.pid)}  # both machines took trials

    client = MlflowClient(team.uri)
    parent_id = study.user_attrs["mlflow.parent_run_id"]
    assert client.get_run(parent_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("team-sweep")
    children = client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert numbers == sorted(t.number for t in done)  # one run per trial, none twice
    assert {r.info.status for r in children} == {"FINISHED"}
    table = Path(client.download_artifacts(parent_id, "sweep/trials.csv", str(tmp_path)))
    with open(table) as f:
        assert len(list(csv.DictReader(f))) == len(done)
