"""`python -m src.serve.predict` on a folder with one unreadable file: a CSV for the others, the
failure listed, exit code 1; thresholds and heatmap files."""

from __future__ import annotations

import shutil
import weakref

import pandas as pd
import pytest

import src.serve.predict as predict
from tests.command_line import run_here
from tests.trained_runs import LABELS, REPO, save_tiny_model

VAL = REPO / "load_dataset" / "tiny_data" / "val"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("predict-model"), thresholds=[0.5, 0.5, 0.5])


def test_folder_with_an_unreadable_file(model_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("val_001.png", "val_002.png", "val_003.png"):
        shutil.copy(VAL / name, images / name)
    (images / "broken.png").write_bytes(b"not an image")
    out = run_here(
        ["-m", "src.serve.predict", str(model_dir), str(images), "--out", "p.csv", "--explain"],
        tmp_path, capsys, monkeypatch,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "1 image(s) skipped" in out.stderr and "broken.png" in out.stderr
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert [p.split("/")[-1] for p in table["path"]] == [
        "val_001.png",
        "val_002.png",
        "val_003.png",
    ]
    assert list(table.columns) == ["path", *[f"prob_{x}" for x in LABELS], "predicted"]
    probs = table[[f"prob_{x}" for x in LABELS]].to_numpy()
    for row, predicted in zip(probs, table["predicted"]):
        assert predicted == ";".join(x for x, p in zip(LABELS, row) if p >= 0.5)
    pictures = sorted(p.name for p in (tmp_path / "p_explanations").iterdir())
    expected = [
        f"{n:04d}_val_00{n + 1}_{label}.png"
        for n, predicted in enumerate(table["predicted"])
        for label in predicted.split(";") if label
    ]  # fmt: skip
    assert pictures == sorted(expected) and pictures


def test_threshold_override_and_a_bad_source(model_dir, tmp_path, capsys, monkeypatch):
    image = str(VAL / "val_003.png")
    out = run_here(
        ["-m", "src.serve.predict", str(model_dir), image, "--threshold", "0", "--out", "all.csv"],
        tmp_path, capsys, monkeypatch,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert pd.read_csv(tmp_path / "all.csv")["predicted"][0] == ";".join(LABELS)
    out = run_here(["-m", "src.serve.predict", "nowhere", image], tmp_path, capsys, monkeypatch)
    assert out.returncode == 2
    assert "SOURCE 'nowhere' is neither a run id" in out.stderr


def test_images_are_decoded_a_batch_at_a_time(model_dir, tmp_path, capsys, monkeypatch):
    """Memory is bounded by a batch, not by the folder: when a batch is decoded, no image of an
    earlier batch is alive. Rows and heatmap names count across batches, an unreadable file
    in the first batch included."""
    images = tmp_path / "images"
    images.mkdir()
    names = [f"val_{i:03d}.png" for i in range(1, 11)]
    for name in names:
        shutil.copy(VAL / name, images / name)
    (images / "val_000.png").write_bytes(b"")  # sorted first: the first batch reads 3 of 4
    decoded: list[weakref.ref] = []
    earlier_alive: list[int] = []
    batch_sizes: list[int] = []
    read_images = predict.read_images

    def counting(paths):
        earlier_alive.append(sum(ref() is not None for ref in decoded))
        batch_sizes.append(len(paths))
        read, failed = read_images(paths)
        decoded.extend(weakref.ref(image) for _, image in read)
        return read, failed

    monkeypatch.setattr(predict, "read_images", counting)
    monkeypatch.setattr(predict, "BATCH", 4)
    monkeypatch.chdir(tmp_path)
    code = predict.main([str(model_dir), str(images), "--out", "p.csv", "--explain"])
    assert code == 1 and "val_000.png" in capsys.readouterr().err
    assert batch_sizes == [4, 4, 3] and earlier_alive == [0, 0, 0] and len(decoded) == 10
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert [p.split("/")[-1] for p in table["path"]] == names
    pictures = sorted(p.name for p in (tmp_path / "p_explanations").iterdir())
    expected = [
        f"{n:04d}_{name[:-4]}_{label}.png"
        for n, (name, predicted) in enumerate(zip(names, table["predicted"]))
        for label in predicted.split(";") if label
    ]  # fmt: skip
    assert pictures == sorted(expected) and pictures
