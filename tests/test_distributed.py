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
from tests.test_resilience import runs_of
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


def _launch(home: Path, name: str, command: list[str], env: dict | None = None) -> Node:
    with open(home / f"{name}.out", "w") as out, open(home / f"{name}.err", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=home, env=env)
    return Node(proc, home, name)


def launch_one_node(tmp_path: Path, args: list[str], name: str) -> Node:
    """`torchrun --standalone --nproc-per-node 2`: two processes on one machine."""
    home = tmp_path / "one-node"
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return _launch(home, name, [*command, "--nproc-per-node", "2", DEMO, *args])


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
        env = {**os.environ, "TMPDIR": str(home / "tmp"), "OMP_NUM_THREADS": "1"}
        nodes.append(_launch(home, name, command, env))
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
    """The launchers' exit codes, within `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    try:
        return [node.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        raise _failed(nodes, f"torchrun still running after {limit_s} s") from None


def wait_for_checkpoint(
    results: Path, nodes: list[Node], after_epoch: int = 0, limit_s: float = 300
) -> Path:
    """The run's last.pt once it holds an epoch after `after_epoch` (the epoch it resumed
    from): the launch is then training, and has something to resume from."""
    deadline = time.monotonic() + limit_s
    while True:
        for last in results.glob("*/*/last.pt"):
            try:
                if torch.load(last, weights_only=True)["epoch"] > after_epoch:
                    return last
            except Exception:  # being replaced right now
                pass
        if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
            raise _failed(nodes, f"no last.pt after epoch {after_epoch} within {limit_s} s")
        time.sleep(0.05)


def sigterm_stops_every_rank(
    mlflow_uri: str, results: Path, nodes: list[Node], signalled: Node, rank_0: Node
) -> int:
    """SIGTERM to the launcher `signalled`, as a scheduler sends it (to the one launcher of a
    machine, or to one machine's of two): every launcher ends with a non-zero code and every
    rank ends with it; the run is KILLED (not FAILED: it stayed RUNNING), and rank 0's
    output says so and gives the resume line. Returns the epoch last.pt holds."""
    workers = [w for node in nodes for w in node.workers()]
    assert len(workers) == 2
    signalled.proc.send_signal(signal.SIGTERM)
    codes = wait_for_exit(nodes, 120)
    err = rank_0.output("err")
    assert all(code != 0 for code in codes), err[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=60 if len(nodes) == 1 else 5)
    assert not alive
    (run,) = runs_of(mlflow_uri, "ddp")
    assert run.info.status == "KILLED", err[-3000:]
    (last,) = results.glob("*/*/last.pt")
    assert "Stopped by SIGTERM; last.pt holds the last complete epoch." in err, err[-3000:]
    assert f"--resume {last.parent}" in err
    return torch.load(last, weights_only=True)["epoch"]


def test_a_torchrun_run_stopped_by_sigterm_on_one_node_and_on_each_of_two_resumes_to_the_end(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    """One run, stopped three times, the ways a scheduler stops a job: SIGTERM to torchrun on
    one node (two processes), then, resumed as on two machines (two launchers of one process
    each), SIGTERM to the launcher of rank 0, and after another resume to the launcher of
    rank 1 (rank 0 was not signalled: it learns of the stop from its peer, ends the run KILLED
    and prints the resume line). Each resume is the same command plus `--resume`; the last
    one, to one epoch more than was saved, finishes the run, which then equals one process
    with the same global batch (8 x 2 = 16): the epochs trained on one node and those on two.
    Only rank 0 tracked the run and wrote checkpoints. The results folder is one every node
    sees, as on a shared file system."""
    shared = tmp_path / "shared"
    args = ["--epochs", "30", "--device", "cpu", "--results-dir", str(shared), *SLOW, *QUICK_END]
    args += ["--batch-size", "8", "--experiment-name", "ddp"]
    one_node = launch_one_node(tmp_path, args, "started")
    last = wait_for_checkpoint(shared, [one_node])
    epoch = sigterm_stops_every_rank(mlflow_uri, shared, [one_node], one_node, one_node)
    resume = [*args, "--resume", str(last.parent)]
    for signalled in (0, 1):
        nodes = launch_two_nodes(tmp_path, resume, f"resumed-{signalled}")
        wait_for_checkpoint(shared, nodes, after_epoch=epoch)
        ranks = {node.rank(): node for node in nodes}
        assert sorted(ranks) == [0, 1]
        epoch = sigterm_stops_every_rank(mlflow_uri, shared, nodes, ranks[signalled], ranks[0])

    epochs = ["--epochs", str(epoch + 1)]
    finished = launch_two_nodes(tmp_path, [*resume, *epochs], "finished")
    assert wait_for_exit(finished, 300) == [0, 0], [n.output("err")[-3000:] for n in finished]
    one = [*args, *epochs, "--batch-size", "16", "--results-dir", str(tmp_path / "single")]
    one = run_here([DEMO, *one, "--experiment-name", "single"], tmp_path, capsys, monkeypatch)
    assert one.returncode == 0, one.stderr[-3000:]
    (run,) = runs_of(mlflow_uri, "ddp")
    (single,) = runs_of(mlflow_uri, "single")
    assert run.info.status == "FINISHED"
    assert run.data.tags["world_size"] == "2" and single.data.tags["world_size"] == "1"
    assert_same_series(MlflowClient(mlflow_uri), run.info.run_id, single.info.run_id)
    # The shared folder and each node's working folder hold the run's checkpoints, once.
    homes = ("shared", "one-node", "node0", "node1")
    written = sorted(p for d in homes for p in (tmp_path / d).rglob("*.pt"))
    assert written == [last.parent / "best.pt", last]


def test_torchrun_on_one_node_runs_to_the_end(mlflow_uri, tmp_path):
    """The README's `torchrun --nproc_per_node=N Demo...` left to finish: both ranks and the
    launcher exit 0, one FINISHED run of world size 2, checkpoints written once (rank 0)."""
    args = ["--epochs", "1", "--device", "cpu", "--results-dir", str(tmp_path / "r"), *QUICK_END]
    node = launch_one_node(tmp_path, [*args, "--experiment-name", "ddp-end"], "finished")
    assert wait_for_exit([node], 300) == [0], node.output("err")[-3000:]
    (run,) = runs_of(mlflow_uri, "ddp-end")
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    assert len(list((tmp_path / "r").glob("ddp-end/*/last.pt"))) == 1


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
