"""Checkpoints written by a background thread: a copy taken at once, one write in flight, every
write waited for before anything reads it, errors raised in the training's own thread."""

from __future__ import annotations

import errno
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import src.train.checkpoint as ckpt_io
import src.train.experiment as experiment
from src.errors import CheckpointError
from src.run_experiment import run
from src.train.training_state import TrainingState
from tests.test_run_experiment import REPO, all_series, metric_series, tiny_config

# A run of 2 epochs whose write of last.pt for epoch 2 (the wait for it at the end of the
# epochs, too) hangs after torch.save, before the fsync and the rename (`atomic_file`);
# `save_atomic` looks `torch.save` up when it is called.
SLOW_WRITE_RUN = """
import sys, time
from pathlib import Path
import torch
import src.train.checkpoint
from src.run_experiment import run
from tests.test_run_experiment import tiny_config

write = torch.save
def slow_save(obj, f, *args, **kwargs):
    write(obj, f, *args, **kwargs)
    if obj.get("kind") == "last" and obj["epoch"] == 2:
        time.sleep(600)  # the test kills the process in here
torch.save = slow_save
torch.set_num_threads(int(sys.argv[2]))  # the test's: the same sums, to the last bit
run(tiny_config(Path(sys.argv[1]), **{"run.run_name": "killed", "train.epochs": 2}))
"""


def compared_series(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """The run's metrics, less the wall-clock ones; a best-epoch summary by its last value."""
    series = all_series(client, run_id)
    series.pop("checkpoint_seconds", None)  # wall-clock, like train_images_per_s
    return {k: v[-1:] if k.startswith("best_") else v for k, v in series.items()}


def _write_in_flight(results: Path, client: MlflowClient, proc: subprocess.Popen) -> Path:
    """The run folder once epoch 1's last.pt is complete, epoch 2's is being written and
    epoch 2 is logged."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for last in results.glob("*/*/last.pt"):  # a complete epoch 1, then a temp file
            folder = last.parent
            if any(folder.glob(".last.pt.*.tmp")) and 2 in [
                m.step for m in client.get_metric_history(folder.name, "val_loss")
            ]:
                return folder
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no write of epoch 2 within 300 s: {proc.communicate()}")


@pytest.mark.slow
def test_sigkill_during_a_background_write_leaves_one_complete_last_pt(mlflow_uri, tmp_path):
    client = MlflowClient(mlflow_uri)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITE_RUN, str(tmp_path), str(torch.get_num_threads())],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The uninterrupted run, while the other process starts.
        full = run(tiny_config(tmp_path, **{"run.run_name": "full", "train.epochs": 2}))
        folder = _write_in_flight(tmp_path / "results", client, proc)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
        proc.communicate()
    # One last.pt, whole: epoch 1's; epoch 2's never got past its temporary file.
    (half, last) = sorted(p.name for p in folder.iterdir() if "last.pt" in p.name)
    assert last == "last.pt" and half.startswith(".last.pt.") and half.endswith(".tmp")
    assert ckpt_io.load_checkpoint(folder)["epoch"] == 1
    assert client.get_run(folder.name).info.status == "RUNNING"

    resumed = run(
        tiny_config(tmp_path, **{"run.run_name": "killed", "train.epochs": 2}), resume=folder
    )
    assert resumed.run_id == folder.name
    assert client.get_run(folder.name).info.status == "FINISHED"
    assert not list(folder.glob(".*.tmp"))  # swept by the next write
    assert ckpt_io.load_checkpoint(folder)["epoch"] == 2
    # Epoch 2 ran again from epoch 1's checkpoint; the run logged it once, as it was.
    assert [s for s, _ in metric_series(client, folder.name, "val_loss")] == [1, 2]
    expected, got = compared_series(client, full.run_id), compared_series(client, folder.name)
    assert "val_auroc_mean" in got and got == expected  # bit for bit


class DiskFull:
    """torch.save that writes half of last.pt of `epoch`, then fails as a full disk does."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.write = torch.save
        self.threads: list[str] = []

    def __call__(self, obj, f, *args, **kwargs):
        if obj.get("kind") == "last" and obj["epoch"] == self.epoch:
            self.threads.append(threading.current_thread().name)
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.write(obj, f, *args, **kwargs)


@pytest.mark.parametrize("epochs", [3, 2], ids=["raised-at-the-next-save", "raised-at-the-end"])
def test_a_failed_background_write_fails_the_run(mlflow_uri, tmp_path, monkeypatch, epochs):
    """Epoch 2's last.pt fails to write: the next save (epoch 3) or the wait at the end of
    the epochs raises it; the run is FAILED and last.pt is still epoch 1's, whole."""
    disk_full = DiskFull(epoch=2)
    monkeypatch.setattr(torch, "save", disk_full)
    # One line naming the file and the resume command (a CheckpointError, a user's error).
    with pytest.raises(CheckpointError, match=r"last\.pt could not be written \(No space left"):
        run(tiny_config(tmp_path, **{"train.epochs": epochs}))
    assert disk_full.threads == ["checkpoint-writer"]  # written in the background
    client = MlflowClient(mlflow_uri)
    (r,) = client.search_runs([client.get_experiment_by_name("tiny-test").experiment_id])
    assert r.info.status == "FAILED"
    # Epoch 3 was trained but not logged: its save raised first.
    assert [s for s, _ in metric_series(client, r.info.run_id, "val_loss")] == [1, 2]
    (folder,) = (tmp_path / "results" / "tiny-test").iterdir()
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".pt", ".tmp")) == [
        "best.pt",
        "last.pt",
    ]
    assert ckpt_io.load_checkpoint(folder)["epoch"] == 1


class SlowSave:
    """torch.save that takes `delay_s` longer: the write is still going when the loop goes on."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.write = torch.save

    def __call__(self, obj, f, *args, **kwargs):
        self.write(obj, f, *args, **kwargs)
        time.sleep(self.delay_s)


def test_checkpoint_seconds_is_logged_per_epoch_and_the_run_waits_for_its_last_write(
    mlflow_uri, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch, "save", SlowSave(0.3))
    result = run(tiny_config(tmp_path))
    client = MlflowClient(mlflow_uri)
    seconds = metric_series(client, result.run_id, "checkpoint_seconds")
    assert [s for s, _ in seconds] == [1, 2, 3]
    assert all(math.isfinite(v) and v >= 0 for _, v in seconds)
    last = ckpt_io.load_checkpoint(result.results_dir)
    assert last["epoch"] == 3  # written before `run` returned
    assert ckpt_io.load_checkpoint(result.results_dir, "best.pt")["epoch"] == result.best_epoch
    # Wall-clock: not kept with the epochs (a resumed run's history equals the original's).
    assert all("checkpoint_seconds" not in h for h in last["history"])
    assert not list(result.results_dir.glob(".*.tmp"))


def test_ctrl_c_waits_for_the_write_in_flight(mlflow_uri, tmp_path, monkeypatch, capsys):
    """Ctrl-C right after epoch 1 is saved, while its write still runs: the run stops KILLED
    with epoch 1's last.pt complete, before the hint that names it is printed."""
    monkeypatch.setattr(torch, "save", SlowSave(0.5))
    folders: list[Path] = []

    def ctrl_c(epoch, *args):
        folders.extend((tmp_path / "results" / "tiny-test").iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "_print_epoch", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path))
    (folder,) = folders
    assert ckpt_io.load_checkpoint(folder)["epoch"] == 1
    assert not list(folder.glob(".*.tmp"))
    assert f"--resume {folder}" in capsys.readouterr().err
    assert MlflowClient(mlflow_uri).get_run(folder.name).info.status == "KILLED"


def test_the_checkpoint_holds_the_state_at_save_time(tmp_path, monkeypatch):
    """What training changes after `save` returns (weights and momentum in place, the next
    epoch's history) is not in the file, though the write is still going then."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = TrainingState(model, optimizer, None, None, patience=0)
    state.run_id = "abc123"
    state.end_epoch({"val_loss": 1.0})
    weights = model.weight.detach().clone()
    momentum = optimizer.state[model.weight]["momentum_buffer"].clone()
    rng = torch.get_rng_state()
    monkeypatch.setattr(torch, "save", SlowSave(0.3))
    with state.saves_in_background():
        state.save(tmp_path, {"run": {}}, improved=True)
        with torch.no_grad():
            model.weight.add_(1.0)
            optimizer.state[model.weight]["momentum_buffer"].add_(1.0)
        state.end_epoch({"val_loss": 0.5})
        torch.rand(5)
        assert not (tmp_path / "last.pt").exists()  # still being written
    last = ckpt_io.load_checkpoint(tmp_path)
    best = ckpt_io.load_checkpoint(tmp_path, "best.pt")
    assert torch.equal(last["model"]["weight"], weights)
    assert torch.equal(best["model"]["weight"], weights)
    assert torch.equal(last["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert torch.equal(last["rng"]["torch"], rng)
    assert last["history"] == [{"epoch": 1, "val_loss": 1.0}] and last["epoch"] == 1
