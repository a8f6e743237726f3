"""What README.md promises about a run's behaviour, each pinned by a test that fails when the
promise breaks: how training draws its batches (a new seeded shuffle each epoch, the same one
on resume, the last partial batch), which epoch is best, what the checkpoints hold, what is
logged when, and what the model takes and returns.

The batches are read from `tests.recording_data:RecordingTinyData`, which writes down every
batch the loader asks it for; real runs on the shipped TinyData (150 train, 50 val, 50 test
images) or on folders written here, tracked in a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.run_experiment import run
from tests.recording_data import read_batches
from tests.test_run_experiment import tiny_config

RECORDING = "tests.recording_data:RecordingTinyData"


def recorded_run(tmp_path: Path, name: str, resume: Path | None = None, **overrides):
    """A run of TinyConv on a RecordingTinyData (the shipped TinyData unless `data.args.data_dir`
    is given) writing its batches to tmp_path/<name>.batches; (the run's result, that file)."""
    batches = tmp_path / f"{name}.batches"
    settings = {
        "data.dataset": RECORDING,
        "data.args.batches_path": str(batches),
        "data.num_workers": 0,
        "run.run_name": name,
        **overrides,
    }
    return run(tiny_config(tmp_path, **settings), resume=resume), batches


def by_epoch(batches: list[list[int]], per_epoch: int) -> list[list[list[int]]]:
    """The batch list cut into epochs of `per_epoch` batches."""
    assert len(batches) % per_epoch == 0, [len(b) for b in batches]
    return [batches[i : i + per_epoch] for i in range(0, len(batches), per_epoch)]


# ------------------------------------------------------------------ how training draws batches
# README "The Demos": "Training drops the last partial batch of each epoch ... With 150 training
# images and batch_size = 16, 9 batches train and 6 images (different ones each epoch, as the
# order is reshuffled) wait for the next epoch. ... Validation and test use every image."
# "Several GPUs": "Each process reads a different shard of the shuffled training set".


@pytest.fixture(scope="module")
def seed0_batches(_store_template, tmp_path_factory) -> Path:
    """The batch file of a 3-epoch run with seed 0 (shared by the tests that compare with it)."""
    import shutil

    folder = tmp_path_factory.mktemp("seed0")
    shutil.copy(_store_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    _, batches = recorded_run(
        folder, "seed0", **{"run.tracking_uri": uri, "run.use_test_set": True}
    )
    return batches


def test_each_epoch_trains_nine_full_batches_of_distinct_images_in_a_new_order(seed0_batches):
    epochs = by_epoch(read_batches(seed0_batches), 9)
    assert len(epochs) == 3
    left_out = []
    for batches in epochs:
        assert [len(b) for b in batches] == [16] * 9  # the partial batch of 6 is dropped
        drawn = [i for b in batches for i in b]
        assert len(set(drawn)) == 144 and set(drawn) <= set(range(150))  # each image once
        assert drawn != sorted(drawn)  # shuffled, not the dataset's order
        left_out.append(set(range(150)) - set(drawn))
    orders = [[i for b in batches for i in b] for batches in epochs]
    # A new shuffle each epoch: another order, and other images wait for the next epoch.
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert all(len(s) == 6 for s in left_out)
    assert left_out[0] != left_out[1] != left_out[2] != left_out[0]
    assert set().union(*map(set, orders)) - set(orders[0])  # a waiting image trains later


def test_validation_and_test_use_every_image_in_order(seed0_batches):
    in_order = [list(range(0, 16)), list(range(16, 32)), list(range(32, 48)), [48, 49]]
    # Each epoch validates on all 50 images; the best weights are evaluated once more at
    # the end, on val and (use_test_set) on test.
    assert by_epoch(read_batches(seed0_batches, "val"), 4) == [in_order] * 4
    assert read_batches(seed0_batches, "test") == in_order


def test_the_same_seed_draws_the_same_batches_and_another_seed_others(
    seed0_batches, mlflow_uri, tmp_path
):
    _, again = recorded_run(tmp_path, "again", **{"run.use_test_set": True})
    assert read_batches(again) == read_batches(seed0_batches)  # another process state, too
    _, other = recorded_run(tmp_path, "seed1", **{"run.seed": 1, "train.epochs": 1})
    first = by_epoch(read_batches(seed0_batches), 9)[0]
    (drawn,) = by_epoch(read_batches(other), 9)
    assert sorted(map(len, drawn)) == [16] * 9
    assert [i for b in drawn for i in b] != [i for b in first for i in b]


def test_a_resumed_run_draws_the_batches_the_uninterrupted_run_drew(
    seed0_batches, mlflow_uri, tmp_path
):
    """README "Checkpoints and resuming": a resumed run gives the same metrics as an
    uninterrupted one; its epochs 2 and 3 must draw the same batches as epochs 2 and 3 of one
    that never stopped (not the order of epoch 1 again, not another seed's)."""
    import torch

    part, batches = recorded_run(tmp_path, "part", **{"train.epochs": 1})
    torch.manual_seed(12345)  # whatever this process did since must not matter
    recorded_run(tmp_path, "part", resume=part.results_dir, **{"train.epochs": 3})
    assert read_batches(batches) == read_batches(seed0_batches)


def test_a_split_smaller_than_a_batch_trains_as_one_batch_of_all_its_images(
    mlflow_uri, tmp_path, capsys
):
    from tests.tiny_fixtures import write_tiny_folder

    labels = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1)]
    data = write_tiny_folder(
        tmp_path / "five",
        {
            "train": {f"{i}.png": labels[i] for i in range(5)},
            "val": {"v0.png": (1, 0, 1), "v1.png": (0, 1, 0)},
        },
    )
    result, batches = recorded_run(tmp_path, "five", **{"data.args.data_dir": str(data)})
    assert "each epoch trains on one batch of 5 images" in capsys.readouterr().out
    drawn = read_batches(batches)
    assert [sorted(b) for b in drawn] == [[0, 1, 2, 3, 4]] * 3  # never an empty epoch
    assert len({tuple(b) for b in drawn}) > 1  # still reshuffled each epoch
    assert result.epochs_run == 3


def test_twenty_images_train_one_full_batch_and_four_wait(mlflow_uri, tmp_path):
    from tests.tiny_fixtures import write_tiny_folder

    train = {f"{i:02d}.png": (i % 2, i // 2 % 2, i // 4 % 2) for i in range(20)}
    data = write_tiny_folder(tmp_path / "twenty", {"train": train, "val": {"v.png": (1, 0, 1)}})
    _, batches = recorded_run(tmp_path, "twenty", **{"data.args.data_dir": str(data)})
    drawn = read_batches(batches)
    assert [len(b) for b in drawn] == [16, 16, 16]  # one full batch per epoch, 4 wait
    assert all(len(set(b)) == 16 and set(b) <= set(range(20)) for b in drawn)
    assert len({frozenset(b) for b in drawn}) > 1  # other images wait in another epoch


def test_max_batches_caps_the_batches_of_each_epoch(mlflow_uri, tmp_path):
    """README flags: "--max-batches N (at most N batches per epoch: a smoke run)"."""
    result, batches = recorded_run(tmp_path, "smoke", **{"train.max_batches": 2})
    assert [len(b) for b in read_batches(batches)] == [16] * 6  # 2 per epoch, 3 epochs
    assert result.epochs_run == 3


def test_each_torchrun_process_reads_its_own_equal_shard_of_the_shuffled_split():
    """README: "Each process reads a different shard of the shuffled training set"; "each
    process's share is first trimmed to an equal size (at most processes - 1 images)"."""
    import torch

    from load_dataset.custom_tiny import TinyData
    from src.distributed import DistInfo
    from src.train.build import build_loader

    dataset = TinyData("train")
    config = tiny_config(Path("unused"), **{"data.batch_size": 4, "data.num_workers": 0})
    orders = {}
    for epoch in (1, 2):
        shards = []
        for rank in range(4):  # 150 images over 4 processes: 37 each, 2 trimmed
            loader = build_loader(
                dataset, config, DistInfo(rank, 4, rank, 4), torch.device("cpu"), train=True
            )
            loader.sampler.set_epoch(epoch)
            batches = [b["img_idx"].tolist() for b in loader]
            assert [len(b) for b in batches] == [4] * 9  # 37 -> 9 full batches, 1 waits
            shards.append([i for b in batches for i in b])
        assert all(len(set(s)) == 36 for s in shards)
        assert len(set().union(*map(set, shards))) == 144  # disjoint shards
        orders[epoch] = shards
    assert orders[1] != orders[2]  # reshuffled per epoch across processes too
