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
import torch.distributed as dist
from mlflow.tracking import MlflowClient

import src.distributed as ddp
import src.interrupts as interrupts
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
    match 127.0.0.1, so each is told (is_host) as its hostname would tell it. Each node gets
    one thread, as torchrun gives each of several processes on one machine."""
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
                env={**os.environ, "TMPDIR": str(home / "tmp"), "OMP_NUM_THREADS": "1"},
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
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0, err[-3000:]
    (last,) = (tmp_path / "r").glob("*/*/last.pt")
    assert "Stopped by SIGTERM; last.pt holds the last complete epoch." in err, err[-3000:]
    assert f"--resume {last.parent}" in err
    (run,) = runs_of(mlflow_uri, "ddp-term")
    assert run.info.status == "KILLED", err[-3000:]
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive


def sigterm_to_one_of_two_launchers(mlflow_uri: str, tmp_path: Path, rank: int) -> list[str]:
    """SIGTERM to the launcher of `rank`, as a scheduler that pre-empts one machine of two
    does: its rank stops, and the other machine's rank, whose next collective call fails,
    stops the same way. Checks that both nodes end and the run is KILLED (not FAILED), with
    the resume line; returns the command's flags. The results folder is one both nodes see,
    as on a shared file system."""
    shared = tmp_path / "shared"
    args = ["--epochs", "30", "--device", "cpu", "--results-dir", str(shared), *SLOW, *QUICK_END]
    args += ["--batch-size", "8", "--experiment-name", "two-term"]
    nodes = launch_two_nodes(tmp_path, args, "stopped")
    wait_for_first_checkpoint(shared, nodes)
    ranks = {node.rank(): node for node in nodes}
    workers = [w for node in nodes for w in node.workers()]
    assert sorted(ranks) == [0, 1]
    ranks[rank].proc.send_signal(signal.SIGTERM)
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
    return args


def test_sigterm_to_the_launcher_of_rank_0_of_two_stops_both_nodes(mlflow_uri, tmp_path):
    sigterm_to_one_of_two_launchers(mlflow_uri, tmp_path, 0)


def test_sigterm_to_the_launcher_of_rank_1_of_two_stops_both_nodes_and_the_run_resumes(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """Rank 0 was not signalled: it learns of the stop from its peer, ends the run KILLED and
    prints the resume line. Both launchers again with `--resume` finish the run, which then
    equals one process with the same global batch (8 x 2 = 16), and only rank 0 tracked it
    and wrote checkpoints."""
    args = sigterm_to_one_of_two_launchers(mlflow_uri, tmp_path, 1)
    (last,) = (tmp_path / "shared").glob("*/*/last.pt")
    # The same command on both machines plus --resume, to one epoch more than was saved.
    epochs = ["--epochs", str(torch.load(last, weights_only=True)["epoch"] + 1)]
    resume = [*args, "--resume", str(last.parent), *epochs]
    resumed = launch_two_nodes(tmp_path, resume, "resumed")
    assert wait_for_exit(resumed, 300) == [0, 0], [n.output("err")[-3000:] for n in resumed]
    one = [*args, *epochs, "--batch-size", "16", "--results-dir", str(tmp_path / "single")]
    one = run_here([DEMO, *one, "--experiment-name", "single"], tmp_path, capsys, monkeypatch)
    assert one.returncode == 0, one.stderr[-3000:]
    (run,) = runs_of(mlflow_uri, "two-term")
    (single,) = runs_of(mlflow_uri, "single")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert_same_series(MlflowClient(mlflow_uri), run.info.run_id, single.info.run_id)
    # The shared folder and each node's working folder hold the run's checkpoints, once.
    written = sorted(p for d in ("shared", "node0", "node1") for p in (tmp_path / d).rglob("*.pt"))
    assert written == [last.parent / "best.pt", last]


def test_a_rank_stops_as_its_peer_was_stopped_and_fails_as_it_failed():
    """`stopping_together` in a real process group of one rank (gloo, an in-memory store): the
    error of a rank whose peer was stopped by a signal becomes that signal's interrupt; an error
    with no stopped peer stays the error (the run ends FAILED)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="closed by peer"):
            with ddp.stopping_together():  # nothing stopped: a peer that crashed
                raise RuntimeError("Connection closed by peer")
        with pytest.raises(KeyboardInterrupt) as ctrl_c, ddp.stopping_together():
            raise KeyboardInterrupt  # this rank's Ctrl-C: told to the others
        assert type(ctrl_c.value) is KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt) as stopped, ddp.stopping_together():
            raise RuntimeError("Connection closed by peer")
        assert type(stopped.value) is KeyboardInterrupt  # a peer's Ctrl-C: exit code 130
        with pytest.raises(interrupts.Preempted), ddp.stopping_together():
            raise interrupts.Preempted
        with pytest.raises(interrupts.Preempted), ddp.stopping_together():
            raise RuntimeError("Connection closed by peer")  # a peer's SIGTERM: 143
    finally:
        dist.destroy_process_group()
