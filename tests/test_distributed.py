"""A real `torchrun` with two CPU processes (gloo) against a single-process run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.command_line import run_here
from tests.test_run_experiment import QUICK_END, REPO, all_series

pytestmark = pytest.mark.slow  # Demos, torchrun or an MLflow server in their own processes

DEMO = str(REPO / "Demo-2-TinyConv-TinyData.py")


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
    a, b = all_series(client, ddp_run.info.run_id), all_series(client, single.info.run_id)
    assert a.keys() == b.keys()
    for key in a:
        assert [s for s, _ in a[key]] == [s for s, _ in b[key]], key
        for (_, x), (_, y) in zip(a[key], b[key]):
            assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (key, x, y)
    # only rank 0 saved checkpoints: one run folder
    assert len(list((tmp_path / "r").glob("ddp/*/last.pt"))) == 1


def test_sigterm_to_torchrun_ends_every_rank_and_marks_the_run_killed(mlflow_uri, tmp_path):
    """What a scheduler does to a multi-GPU job: SIGTERM to the launcher. torchrun passes it
    to each rank; each stops at a safe point and the run ends KILLED (it stayed RUNNING)."""
    import signal

    import psutil

    from tests.test_resilience import _first_checkpoint, runs_of

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
