"""A real `torchrun` with two CPU processes (gloo) against a single-process run: on one node,
and as on two machines (two launchers meeting at a c10d rendezvous)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.command_line import run_here
from tests.test_resilience import _first_checkpoint, runs_of
from tests.test_run_experiment import QUICK_END, REPO, all_series

pytestmark = pytest.mark.slow  # Demos, torchrun or an MLflow server in their own processes

DEMO = str(REPO / "Demo-2-TinyConv-TinyData.py")
# A run that is still training when it is signalled (30 epochs of 0.4 s at least).
SLOW = [
    "--set",
    'data.dataset="tests.faulty_data:SlowTinyData"',
    "--set",
    "data.args.delay_s=0.004",
]


def assert_same_series(client: MlflowClient, run_id: str, reference_id: str) -> None:
    """Every metric of `run_id` at the same steps as in `reference_id`, equal to 1e-5."""
    a, b = all_series(client, run_id), all_series(client, reference_id)
    assert a.keys() == b.keys()
    for key in a:
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]], key
        for (_, x), (_, y) in zip(a[key], b[key]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (key, x, y)


@dataclass
class Node:
    """One `torchrun` launcher as on a machine of its own: its working folder, TMPDIR, output."""

    proc: subprocess.Popen
    home: Path
    name: str

    def output(self, stream: str) -> str:
        return (self.home / f"{self.name}.{stream}").read_text()

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()

    def rank(self) -> int:
        """The global rank of this node's one worker (the rendezvous orders the nodes)."""
        (worker,) = self.workers()
        return int(worker.environ()["RANK"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(tmp_path: Path, args: list[str], name: str) -> list[Node]:
    """`torchrun --nnodes 2 --nproc-per-node 1` with a c10d rendezvous, started twice, as on
    two machines. The machine whose address is the endpoint hosts the rendezvous; here both
    match 127.0.0.1, so each is told (is_host) as its hostname would tell it."""
    port, nodes = _free_port(), []
    for node in (0, 1):
        home = tmp_path / f"node{node}"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        command += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", name]
        command += ["--rdzv-conf", f"is_host={int(node == 0)}", DEMO, *args]
        with open(home / f"{name}.out", "w") as out, open(home / f"{name}.err", "w") as err:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=err,
                cwd=home,
                env={**os.environ, "TMPDIR": str(home / "tmp")},
            )
        nodes.append(Node(proc, home, name))
    return nodes


def _failed(nodes: list[Node], why: str) -> AssertionError:
    """Kill what is still running (launchers and their workers); the error shows their output."""
    for node in nodes:
        if node.proc.poll() is None:
            for worker in node.workers():
                worker.kill()
            node.proc.kill()
            node.proc.wait()
    shown = "\n".join(f"--- {n.home.name}\n{n.output('err')[-3000:]}" for n in nodes)
    return AssertionError(f"{why}\n{shown}")


def wait_for_exit(nodes: list[Node], limit_s: float) -> list[int]:
    """Both launchers' exit codes, within `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    try:
        return [node.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        raise _failed(nodes, f"torchrun still running after {limit_s} s") from None


def wait_for_first_checkpoint(results: Path, nodes: list[Node], limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s
    while not any(results.glob("*/*/last.pt")):
        if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
            raise _failed(nodes, f"no last.pt within {limit_s} s, or a launcher ended")
        time.sleep(0.05)


def test_torchrun_two_processes_equal_one_process_of_the_same_global_batch(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    common = ["--epochs", "2", "--device", "cpu", "--results-dir", str(tmp_path / "r")]
    common += QUICK_END
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            DEMO,
            *common,
            "--batch-size",
            "8",
            "--experiment-name",
            "ddp",
            "--run-name",
            "two",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_args = [*common, "--batch-size", "16", "--experiment-name", "single", "--run-name", "one"]
    one = run_here([DEMO, *one_args], tmp_path, capsys, monkeypatch)  # one process: this one
    assert one.returncode == 0, one.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (ddp_run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    (single,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert ddp_run.data.tags["world_size"] == "2" and single.data.tags["world_size"] == "1"
    assert_same_series(client, ddp_run.info.run_id, single.info.run_id)
    # only rank 0 saved checkpoints: one run folder
    assert len(list((tmp_path / "r").glob("ddp/*/last.pt"))) == 1


def test_sigterm_to_torchrun_ends_every_rank_and_marks_the_run_killed(mlflow_uri, tmp_path):
    """What a scheduler does to a multi-GPU job: SIGTERM to the launcher. torchrun passes it
    to each rank; each stops at a safe point and the run ends KILLED (it stayed RUNNING)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [DEMO, "--epochs", "30", "--device", "cpu", "--results-dir", str(tmp_path / "r")]
        + [
            "--experiment-name",
            "ddp-term",
            "--set",
            'data.dataset="tests.faulty_data:SlowTinyData"',
        ]
        + ["--set", "data.args.delay_s=0.004", *QUICK_END],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    _first_checkpoint(tmp_path / "r", proc)
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, err[-3000:]
    (last,) = (tmp_path / "r").glob("*/*/last.pt")
    assert "Stopped by SIGTERM; last.pt holds the last complete epoch." in err, err[-3000:]
    assert f"--resume {last.parent}" in err
    (run,) = runs_of(mlflow_uri, "ddp-term")
    assert run.info.status == "KILLED", err[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert not alive


def test_two_launchers_as_on_two_machines_equal_one_process_of_the_same_global_batch(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """The README's two-machine command, rehearsed on one: each launcher in its own working
    folder with the same relative --results-dir, as the same command on two machines."""
    common = ["--epochs", "2", "--device", "cpu", *QUICK_END]
    two = ["--results-dir", "r", "--batch-size", "8", "--experiment-name", "ddp", *common]
    nodes = launch_two_nodes(tmp_path, two, "train")
    assert wait_for_exit(nodes, 300) == [0, 0], [n.output("err")[-3000:] for n in nodes]
    one = [*common, "--results-dir", str(tmp_path / "single"), "--batch-size", "16"]
    one = run_here([DEMO, *one, "--experiment-name", "single"], tmp_path, capsys, monkeypatch)
    assert one.returncode == 0, one.stderr[-3000:]
    client = MlflowClient(mlflow_uri)
    (ddp_run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    (single,) = client.search_runs([client.get_experiment_by_name("single").experiment_id])
    assert ddp_run.data.tags["world_size"] == "2"
    assert_same_series(client, ddp_run.info.run_id, single.info.run_id)
    # Only rank 0 tracked and saved checkpoints, on its node; the other node wrote nothing.
    (main,) = [n for n in nodes if f"Run {ddp_run.info.run_id} in MLflow" in n.output("out")]
    lasts = [last for n in nodes for last in (n.home / "r").glob("*/*/last.pt")]
    assert lasts == [main.home / "r" / "ddp" / ddp_run.info.run_id / "last.pt"]


@pytest.mark.parametrize("signalled", [0, 1], ids=["launcher of rank 0", "launcher of rank 1"])
def test_sigterm_to_one_of_two_launchers_stops_both_and_the_run_resumes(
    mlflow_uri, tmp_path, signalled
):
    """A scheduler that pre-empts one machine of two signals one launcher: its rank stops,
    and the other machine's rank, whose next collective call fails, stops the same way. The
    run ends KILLED (not FAILED) with the resume line; both launchers again with `--resume`
    finish it. The results folder is one both nodes see, as on a shared file system."""
    shared = tmp_path / "shared"
    args = ["--epochs", "30", "--device", "cpu", "--results-dir", str(shared), *SLOW, *QUICK_END]
    args += ["--experiment-name", "two-term"]
    nodes = launch_two_nodes(tmp_path, args, "stopped")
    wait_for_first_checkpoint(shared, nodes)
    ranks = {node.rank(): node for node in nodes}
    workers = [w for node in nodes for w in node.workers()]
    assert sorted(ranks) == [0, 1]
    ranks[signalled].proc.send_signal(signal.SIGTERM)
    codes = wait_for_exit(nodes, 120)
    err = ranks[0].output("err")
    assert all(code != 0 for code in codes), err[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    (run,) = runs_of(mlflow_uri, "two-term")
    assert run.info.status == "KILLED", err[-3000:]
    (last,) = shared.glob("*/*/last.pt")
    assert "Stopped by SIGTERM; last.pt holds the last complete epoch." in err, err[-3000:]
    assert f"--resume {last.parent}" in err
    # The same command on both machines plus --resume, to one epoch more than was saved.
    epoch = torch.load(last, weights_only=True)["epoch"]
    resume = [*args, "--resume", str(last.parent), "--epochs", str(epoch + 1)]
    resumed = launch_two_nodes(tmp_path, resume, "resumed")
    assert wait_for_exit(resumed, 300) == [0, 0], [n.output("err")[-3000:] for n in resumed]
    (run,) = runs_of(mlflow_uri, "two-term")
    assert run.info.status == "FINISHED"
    steps = [
        m.step for m in MlflowClient(mlflow_uri).get_metric_history(run.info.run_id, "val_loss")
    ]
    assert sorted(steps) == list(range(1, epoch + 2))
