"""Forks that need no code: torchvision's ImageFolder named in a TOML, and the tutorial's own
TinyData folder (9 training images, smaller than the default batch) given with --data-dir."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.command_line import run_here
from tests.tiny_fixtures import write_png, write_tiny_folder

REPO = Path(__file__).resolve().parent.parent
COLOURS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}

pytestmark = pytest.mark.slow


def cli(args: list[str], cwd: Path, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """`python ARGS` (tests/command_line.py: in this process, as `__main__`)."""
    return run_here(args, cwd, capsys, monkeypatch)


def write_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/<split>/<colour>/<i>.png: noisy squares of the colour (40 x 40, resized to 32)."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name, rgb in COLOURS.items():
            for i in range(n):
                noise = rng.integers(-20, 21, size=(40, 40, 3))
                pixels = np.clip(np.array(rgb) + noise, 0, 255)
                write_png(root / split / name / f"{i:03d}.png", pixels)
    return root


def test_imagefolder_trains_end_to_end_from_the_toml_alone(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    data = write_image_folder(tmp_path / "shapes", {"train": 8, "val": 3})
    out = cli(
        [
            "-m",
            "src.run_experiment",
            str(REPO / "experiments" / "imagefolder_tinyconv.toml"),
            "--data-dir",
            str(data),
            "--epochs",
            "3",
            "--results-dir",
            str(tmp_path / "results"),
        ],
        REPO,
        capsys,
        monkeypatch,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Images: train 24, val 9." in out.stdout
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ImageFolder-TinyConv")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.args.root"] == str(data / "{setname}")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == [1, 2, 3]
    # ImageFolder's `classes` (sorted folder names) are the label names.
    assert {"val_auroc/blue", "val_auroc/green", "val_auroc/red"} <= set(run.data.metrics)
    # Three well-separated colours: the classes are told apart after three epochs.
    assert run.data.metrics["val_auroc_mean"] > 0.9
    assert run.data.tags["data.train.count"] == "24"


def tutorial_tiny_folder(root: Path) -> Path:
    """The tutorial's TinyData layout: 001.png .. 009.png train, 0010 .. 0014 val,
    0015 .. 0018 test (its CSV's rows)."""
    rows = {
        "train": ["101", "010", "010", "001", "100", "001", "100", "000", "010"],
        "val": ["110", "100", "010", "110", "100"],
        "test": ["101", "011", "110", "011"],
    }
    splits, n = {}, 0
    for split, labels in rows.items():
        splits[split] = {}
        for bits in labels:
            n += 1
            name = f"{n:03d}.png" if n < 10 else f"00{n}.png"
            splits[split][name] = tuple(int(b) for b in bits)
    return write_tiny_folder(root, splits)


def test_demo2_on_the_tutorials_tiny_data_trains_on_all_nine_images(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    data = tutorial_tiny_folder(tmp_path / "tiny_data")
    assert len(list((data / "train").iterdir())) == 9
    out = cli(
        [
            str(REPO / "Demo-2-TinyConv-TinyData.py"),
            "--data-dir",
            str(data),
            "--epochs",
            "2",
            "--results-dir",
            str(tmp_path / "results"),
        ],
        tmp_path,
        capsys,
        monkeypatch,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Images: train 9, val 5." in out.stdout
    assert "each epoch trains on one batch of 9 images" in out.stdout
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("Demo-2-TinyConv-TinyData")
    (run,) = client.search_runs([exp.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == [1, 2]
    assert all(m.value > 0.1 for m in losses)  # an empty epoch would log 0.0
    assert all(
        m.value > 0 for m in client.get_metric_history(run.info.run_id, "train_images_per_s")
    )
