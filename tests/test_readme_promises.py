"""What README.md promises about a run's behaviour, each pinned by a test that fails when the
promise breaks: how training draws its batches (a new seeded shuffle each epoch, the same one
on resume, the last partial batch), which epoch is best, what the checkpoints hold, what is
logged when, and what the model takes and returns.

The batches are read from `tests.recording_data:RecordingTinyData`, which writes down every
batch the loader asks it for; real runs on the shipped TinyData (150 train, 50 val, 50 test
images) or on folders written here, tracked in a real SQLite store."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from src.run_experiment import run
from tests.recording_data import read_batches
from tests.test_run_experiment import tiny_config

RECORDING = "tests.recording_data:RecordingTinyData"


def recorded_run(tmp_path: Path, name: str, resume: Path | None = None, on_epoch=None, **overrides):
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
    return run(tiny_config(tmp_path, **settings), resume=resume, on_epoch=on_epoch), batches


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


def test_the_same_seed_draws_the_same_batches_also_resumed_and_another_seed_others(
    seed0_batches, mlflow_uri, tmp_path
):
    """A run with the seed-0 run's seed, in another process state, draws its batches; stopped
    after epoch 1 and resumed (README "Checkpoints and resuming": a resumed run gives the same
    metrics as an uninterrupted one), its epochs 2 and 3 draw the batches of epochs 2 and 3 of
    the run that never stopped (not the order of epoch 1 again, not another seed's). Another
    seed draws other batches."""
    import torch

    part, batches = recorded_run(tmp_path, "part", **{"train.epochs": 1})
    assert read_batches(batches) == read_batches(seed0_batches)[:9]  # another process state
    # README: "The test split is used only with use_test_set = true" (the seed-0 run sets it).
    assert read_batches(batches, "test") == [] and read_batches(seed0_batches, "test")
    torch.manual_seed(12345)  # whatever this process did since must not matter
    recorded_run(tmp_path, "part", resume=part.results_dir, **{"train.epochs": 3})
    assert read_batches(batches) == read_batches(seed0_batches)
    _, other = recorded_run(tmp_path, "seed1", **{"run.seed": 1, "train.epochs": 1})
    first = by_epoch(read_batches(seed0_batches), 9)[0]
    (drawn,) = by_epoch(read_batches(other), 9)
    assert sorted(map(len, drawn)) == [16] * 9
    assert [i for b in drawn for i in b] != [i for b in first for i in b]


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


def test_max_batches_caps_the_batches_of_each_epoch(mlflow_uri, tmp_path, monkeypatch):
    """README flags: "--max-batches N (at most N batches per epoch: a smoke run)". The same
    run checks two more promises (one run for three): "--deterministic turns on
    torch.use_deterministic_algorithms" for the run, and the default scheduler "none" keeps
    the tutorial's constant rate, logged each epoch as lr (the other schedules:
    test_the_learning_rate_of_each_epoch_is_the_schedules)."""
    import torch
    from mlflow.tracking import MlflowClient

    from tests.test_run_experiment import metric_series

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # what the run sets goes after
    seen = []

    def look(epoch, metrics) -> bool:
        seen.append(
            (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
        )
        return False

    try:
        result, batches = recorded_run(
            tmp_path, "smoke", on_epoch=look, **{"train.max_batches": 2, "run.deterministic": True}
        )
    finally:  # as every other test expects the process
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    assert [len(b) for b in read_batches(batches)] == [16] * 6  # 2 per epoch, 3 epochs
    assert result.epochs_run == 3
    assert seen == [(True, True)] * 3
    lr = metric_series(MlflowClient(mlflow_uri), result.run_id, "lr")
    assert [s for s, _ in lr] == [1, 2, 3]
    assert [v for _, v in lr] == pytest.approx([1e-3] * 3, rel=1e-9)


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


# ------------------------------------------------------------------ which epoch is best
# README "The Demos": "ends with the best epoch: the one with the lowest validation loss, whose
# weights are best.pt and whose metrics are logged as best_* at that epoch's step. Early
# stopping counts the epochs since that best one (patience)."


def val_loss_of(weights: dict, config) -> float:
    """The mean BCE of `weights` (a TinyConv state dict) over the 50 validation images of the
    shipped TinyData (no noise in any dataset's val split), computed here in one batch."""
    import torch

    from load_dataset.custom_tiny import TinyData
    from models.custom_models_base import TinyConv

    val = TinyData("val")
    x = torch.stack([val[i]["data"] for i in range(len(val))])
    y = torch.from_numpy(val.labels).float()
    net = TinyConv(**config.model.args)
    net.load_state_dict(weights)
    with torch.no_grad():
        return float(torch.nn.functional.binary_cross_entropy_with_logits(net.eval()(x)["out"], y))


def test_the_best_epoch_is_the_lowest_val_loss_and_patience_counts_from_it(
    mlflow_uri, tmp_path, capsys
):
    """lr 0.5 makes val_loss jump about: on this data 3.11, 0.70, 0.74, 0.67, 0.67, 0.69, so
    the best epoch (4) is neither the first, nor the last, nor the one of the highest AUROC
    (epoch 1); epoch 3 was worse than epoch 2 before epoch 4 improved, and patience 2 stops
    after epoch 6, two epochs after the best one (not after epoch 5, the second bad epoch)."""
    from mlflow.tracking import MlflowClient

    from src.train.checkpoint import load_checkpoint
    from tests.test_run_experiment import metric_series

    config = tiny_config(tmp_path, **{"optimizer.lr": 0.5, "train.epochs": 10, "train.patience": 2})
    result = run(config)
    client = MlflowClient(mlflow_uri)
    losses = [v for _, v in metric_series(client, result.run_id, "val_loss")]
    best = 1 + min(range(len(losses)), key=losses.__getitem__)  # the first of equal ones
    auroc = [v for _, v in metric_series(client, result.run_id, "val_auroc_mean")]
    assert best not in (1, len(losses), 1 + auroc.index(max(auroc)))  # the case is telling
    assert any(b > a for a, b in zip(losses[: best - 1], losses[1:best]))  # a bad epoch before
    assert result.best_epoch == best
    assert result.stopped_early and result.epochs_run == len(losses) == best + 2
    # README "Looking at runs": per epoch, data_wait_fraction is "the share of the epoch spent
    # waiting for the data loader" and train_images_per_s the epoch's speed (144 images).
    epochs_logged = list(range(1, len(losses) + 1))
    for key in ("data_wait_fraction", "train_images_per_s", "checkpoint_seconds", "lr"):
        assert [s for s, _ in metric_series(client, result.run_id, key)] == epochs_logged, key
    assert all(0 <= v <= 1 for _, v in metric_series(client, result.run_id, "data_wait_fraction"))
    assert all(v > 0 for _, v in metric_series(client, result.run_id, "train_images_per_s"))
    # best_* are the best epoch's figures, logged at its step.
    assert metric_series(client, result.run_id, "best_epoch") == [(best, float(best))]
    for key in ("val_loss", "val_auroc_mean", "val_ap_mean"):
        (step, value), *_ = metric_series(client, result.run_id, f"best_{key}")
        assert step == best
        assert value == pytest.approx(dict(metric_series(client, result.run_id, key))[best])
    # best.pt holds the best epoch's weights (their val_loss, computed here), last.pt the last.
    best_pt = load_checkpoint(result.results_dir, "best.pt")
    assert best_pt["epoch"] == best
    assert val_loss_of(best_pt["model"], config) == pytest.approx(losses[best - 1], rel=1e-5)
    last_pt = load_checkpoint(result.results_dir)
    assert last_pt["epoch"] == best + 2
    assert val_loss_of(last_pt["model"], config) == pytest.approx(losses[-1], rel=1e-5)
    # "A run starts by printing the device it picked and the size of each split, then one
    # line per epoch (epoch 1/100 is the first)".
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Device: cpu (cpu). Images: train 150, val 50."
    epochs = [line.split()[1] for line in lines if line.startswith("epoch ")]
    assert epochs == [f"{e}/10" for e in range(1, best + 3)]


def test_a_resumed_run_counts_patience_from_the_best_epoch_before_the_stop(mlflow_uri, tmp_path):
    """README "Checkpoints and resuming": last.pt holds "the per-epoch history from which early
    stopping's state follows". lr 0: the weights never change, so epoch 1 stays best and every
    later epoch is a bad one; with patience 3 a run stopped after epoch 2 and resumed stops after
    epoch 4, as an uninterrupted run does."""
    frozen = {"optimizer.lr": 0.0, "train.patience": 3}
    part = run(tiny_config(tmp_path, **{**frozen, "train.epochs": 2}))
    assert not part.stopped_early and part.epochs_run == 2
    resumed = run(tiny_config(tmp_path, **{**frozen, "train.epochs": 10}), resume=part.results_dir)
    assert resumed.run_id == part.run_id
    assert resumed.stopped_early and resumed.epochs_run == 4 and resumed.best_epoch == 1


# ------------------------------------------------------------------ what the checkpoints hold
# README "Checkpoints and resuming": "last.pt (everything needed to resume: model, optimizer,
# learning-rate schedule, the last complete epoch, the per-epoch history from which early
# stopping's state follows, RNG states, the MLflow run id) and best.pt (the weights with the
# lowest validation loss)".


def test_last_pt_holds_every_part_of_the_state_at_the_end_of_its_epoch(mlflow_uri, tmp_path):
    import random

    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from src.train.checkpoint import load_checkpoint
    from tests.test_run_experiment import metric_series

    at_epoch_end = {}

    def remember_the_generators(epoch, metrics) -> bool:
        at_epoch_end[epoch] = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        return False

    step = {"optimizer.scheduler": "step", "optimizer.step_size": 1, "optimizer.gamma": 0.5}
    # Noise drawn from torch's generator per training sample: its state moves every epoch.
    noisy = {"data.dataset": "tests.random_data:NoisyTinyData", "data.num_workers": 0}
    config = tiny_config(tmp_path, **{**step, **noisy, "train.epochs": 2})
    result = run(config, on_epoch=remember_the_generators)
    last = load_checkpoint(result.results_dir)
    assert {"model", "optimizer", "scheduler", "rng", "epoch", "history", "run_id"} <= set(last)
    assert last["epoch"] == 2 and last["run_id"] == result.run_id
    assert last["config"] == config.to_dict()
    logged = metric_series(MlflowClient(mlflow_uri), result.run_id, "val_loss")
    assert [(h["epoch"], h["val_loss"]) for h in last["history"]] == logged
    assert val_loss_of(last["model"], config) == pytest.approx(logged[-1][1], rel=1e-5)
    # The optimizer's momentum, and the schedule after its second step: the next epoch's lr.
    momentum = [s["momentum_buffer"] for s in last["optimizer"]["state"].values()]
    assert len(momentum) == len(last["model"]) and all(m.abs().sum() > 0 for m in momentum)
    assert last["scheduler"]["last_epoch"] == 2
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3 * 0.5**2)
    # The random generators as the epoch left them (not as an earlier epoch did).
    cpu, numpy, python = at_epoch_end[2]
    assert not torch.equal(at_epoch_end[1][0], cpu)
    assert torch.equal(last["rng"]["torch"], cpu)
    assert np.array_equal(last["rng"]["numpy"][1].numpy(), numpy[1])
    assert last["rng"]["python"] == python
    best = load_checkpoint(result.results_dir, "best.pt")
    assert best["epoch"] == result.best_epoch and best["run_id"] == result.run_id
    assert best["metrics"]["val_loss"] == min(v for _, v in logged)


def test_keep_last_pt_false_keeps_last_pt_of_a_stopped_run_to_resume(mlflow_uri, tmp_path):
    """README: "With --set run.keep_last_pt=false a run that FINISHED deletes its last.pt ...;
    a run that stopped keeps it, to resume"."""
    from mlflow.tracking import MlflowClient

    def ctrl_c(epoch, metrics) -> bool:
        raise KeyboardInterrupt

    config = tiny_config(tmp_path, **{"run.keep_last_pt": False})
    with pytest.raises(KeyboardInterrupt):
        run(config, on_epoch=ctrl_c)
    (folder,) = (tmp_path / "results" / "tiny-test").iterdir()
    assert sorted(p.name for p in folder.glob("*.pt")) == ["best.pt", "last.pt"]
    assert MlflowClient(mlflow_uri).get_run(folder.name).info.status == "KILLED"
    resumed = run(config, resume=folder)
    assert resumed.run_id == folder.name and resumed.epochs_run == 3
    assert sorted(p.name for p in folder.glob("*.pt")) == ["best.pt"]


# ------------------------------------------------------------------ learning rate, determinism
# README: "[optimizer] scheduler = "cosine" (over train.epochs) or "step" (times gamma every
# step_size epochs); the default "none" keeps the tutorial's constant rate. The rate of each
# epoch is logged as lr." "--deterministic turns on torch.use_deterministic_algorithms".
# (Both "none" and --deterministic are checked on the run of test_max_batches_caps_the_...)

COS = math.cos


@pytest.mark.parametrize(
    "settings, factors",
    [
        (
            {"optimizer.scheduler": "cosine"},
            [1, (1 + COS(math.pi / 4)) / 2, 1 / 2, (1 + COS(3 * math.pi / 4)) / 2],
        ),
        (
            {"optimizer.scheduler": "step", "optimizer.step_size": 2, "optimizer.gamma": 0.1},
            [1, 1, 0.1, 0.1],
        ),
    ],
    ids=["cosine", "step"],
)
def test_the_learning_rate_of_each_epoch_is_the_schedules(mlflow_uri, tmp_path, settings, factors):
    from mlflow.tracking import MlflowClient

    from tests.test_run_experiment import metric_series

    result = run(tiny_config(tmp_path, **{**settings, "train.epochs": 4, "train.max_batches": 1}))
    lr = metric_series(MlflowClient(mlflow_uri), result.run_id, "lr")
    assert [s for s, _ in lr] == [1, 2, 3, 4]
    assert [v for _, v in lr] == pytest.approx([1e-3 * f for f in factors], rel=1e-9)


# ------------------------------------------------------------------ what the model returns
# README "The run's MLflow model": "The output holds probabilities: sigmoid per label, softmax
# for a problem = "multiclass" run"; "an image the dataset would have read gets exactly the
# probabilities the run's validation metrics were computed from".


@pytest.fixture(scope="module")
def trained_tinyconv(tmp_path_factory):
    """(network, val dataset, its best.pt): TinyConv trained in-process on TinyData."""
    import torch

    from tests.trained_runs import quick_tinyconv

    net, val = quick_tinyconv()
    best_pt = tmp_path_factory.mktemp("tinyconv") / "best.pt"
    torch.save({"model": net.state_dict(), "epoch": 1}, best_pt)
    return net, val, best_pt


@pytest.mark.parametrize("problem", ["multilabel", "multiclass"])
def test_the_model_returns_sigmoid_or_softmax_probabilities_of_the_datasets_input(
    trained_tinyconv, problem
):
    import numpy as np
    import torch

    import src.serve.model_package as model_package
    from load_dataset.utils import open_rgb
    from tests.trained_runs import LABELS

    net, val, best_pt = trained_tinyconv
    spec = model_package.ClassifierSpec(
        "models.custom_models_base:TinyConv", {"n_outputs": 3}, LABELS, problem,
        val.input_transform,
    )  # fmt: skip
    classifier = model_package.ImageClassifier(spec)
    classifier.load_weights(best_pt)
    images = np.stack([np.asarray(open_rgb(p)) for p in val.image_paths[:5]])
    table = classifier.predict(None, images)
    assert list(table.columns) == LABELS and table.shape == (5, 3)
    with torch.no_grad():
        logits = net(torch.stack([val[i]["data"] for i in range(5)]))["out"]
    expected = logits.softmax(1) if problem == "multiclass" else logits.sigmoid()
    np.testing.assert_allclose(table.to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
    sums = table.to_numpy().sum(1)
    if problem == "multiclass":
        np.testing.assert_allclose(sums, 1, rtol=1e-6)
    else:  # independent labels: these images' probabilities do not sum to 1
        assert not np.allclose(sums, 1, atol=1e-3)
