"""Forks that need no code: torchvision's ImageFolder named in a TOML, and the tutorial's own
TinyData folder (9 training images, smaller than the default batch) given with --data-dir; and
a fork whose images are not the size its model takes, stopped before any run starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from load_dataset.generators.pascal_tree import make_pascal_tree
from tests.builtin_fixtures import make_cifar10
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


def imagefolder_at_48(tmp_path: Path, monkeypatch) -> list[str]:
    """The ImageFolder TOML with its Resize at 48 x 48 (TinyConv takes 32 x 32)."""
    toml = (REPO / "experiments" / "imagefolder_tinyconv.toml").read_text()
    assert toml.count("size = [32, 32]") == 1
    path = tmp_path / "imagefolder_48.toml"
    path.write_text(toml.replace("size = [32, 32]", "size = [48, 48]"))
    data = write_image_folder(tmp_path / "shapes", {"train": 4, "val": 2})
    return ["-m", "src.run_experiment", str(path), "--data-dir", str(data)]


def tiny_data_at_48(tmp_path: Path, monkeypatch) -> list[str]:
    """Demo-2 (TinyConv) on a TinyData folder of 48 x 48 images."""
    splits = {
        "train": {"a.png": (1, 0, 1), "b.png": (0, 1, 0)},
        "val": {"c.png": (1, 1, 0), "d.png": (0, 0, 1)},
    }
    data = write_tiny_folder(tmp_path / "tiny48", splits, size=48)
    return [str(REPO / "Demo-2-TinyConv-TinyData.py"), "--data-dir", str(data)]


def cifar10_at_48(tmp_path: Path, monkeypatch) -> list[str]:
    """The CIFAR-10 example (TinyConv) with its images resized to 48 x 48."""
    make_cifar10(tmp_path / "cifar", monkeypatch)
    toml = str(REPO / "experiments" / "cifar10_tinyconv.toml")
    size = ["--set", "data.args.image_size=48", "--device", "cpu"]
    return ["-m", "src.run_experiment", toml, "--data-dir", str(tmp_path / "cifar"), *size]


def pascal_at_96_for_a_128_model(tmp_path: Path, monkeypatch) -> list[str]:
    """Demo-3 at 96 px with its VGG16 built for 128 px ([model.args] image_size)."""
    tree = make_pascal_tree(tmp_path / "pascal")
    dirs = ["--voc-dir", str(tree.voc_dir), "--sbd-dir", str(tree.sbd_dir), "--image-size", "96"]
    model = ["--no-pretrained", "--set", "model.args.image_size=128", "--device", "cpu"]
    return [str(REPO / "Demo-3-VGG16-PASCAL.py"), *dirs, *model, "--num-workers", "0"]


# TinyConv's linear layer takes 16 x 3 x 3 = 144 features; 48 x 48 images give 16 x 5 x 5.
TINYCONV_AT_48 = "mat1 and mat2 shapes cannot be multiplied (1x400 and 144x"


@pytest.mark.parametrize(
    ("fork", "model", "size", "why"),
    [
        (imagefolder_at_48, "TinyConv", "3 x 48 x 48", TINYCONV_AT_48),
        (tiny_data_at_48, "TinyConv", "3 x 48 x 48", TINYCONV_AT_48),
        (cifar10_at_48, "TinyConv", "3 x 48 x 48", TINYCONV_AT_48),
        (
            pascal_at_96_for_a_128_model,
            "VGG16",
            "3 x 96 x 96",
            "VGG16 was built for 128x128 images but got 96x96; make the model's image_size "
            "equal the dataset's; ",
        ),
    ],
)
def test_images_of_another_size_than_the_model_takes_stop_before_any_run(
    fork, model, size, why, mlflow_uri, tmp_path, capsys, monkeypatch
):
    args = [*fork(tmp_path, monkeypatch), "--results-dir", str(tmp_path / "results")]
    out = cli(args, tmp_path, capsys, monkeypatch)
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(
        f"error: The model models.custom_models_base:{model} fails on the train split's images "
        f"of {size} ([C, H, W]): {why}"
    ), line
    assert line.endswith("or use a model for any size (models.any_size:TinyConvAnySize).")
    client = MlflowClient(mlflow_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments) == []
    assert not (tmp_path / "results").exists()


def test_the_model_for_any_size_trains_on_the_48_pixel_images(
    mlflow_uri, tmp_path, capsys, monkeypatch
):
    args = imagefolder_at_48(tmp_path, monkeypatch)
    args += ["--set", "model.model=models.any_size:TinyConvAnySize", "--epochs", "1"]
    out = cli([*args, "--results-dir", str(tmp_path / "results")], tmp_path, capsys, monkeypatch)
    assert out.returncode == 0, out.stdout + out.stderr
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("ImageFolder-TinyConv").experiment_id]
    )
    assert run.info.status == "FINISHED" and "val_accuracy" in run.data.metrics
