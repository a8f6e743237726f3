"""The MLflow model a finished run logs (src/serve/model_package.py): the probabilities of best.pt
through the training loop, for TinyConv on TinyData and a random VGG16 on PASCAL at 96 px; the
per-label thresholds; the registry; a real `mlflow models serve` answering a request."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import src.serve.model_package as model_package
from load_dataset.generators.pascal_tree import make_pascal_tree
from load_dataset.utils import open_rgb
from src import config as cfg
from src import evaluate
from src.distributed import DistInfo
from src.train.build import build_dataset, build_loader, build_model
from src.train.loop import BatchPrep, BatchSettings, make_loss, predict
from tests.trained_runs import LABELS, REPO, train_tiny


@pytest.fixture(scope="module")
def tiny(_store_template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    return train_tiny(folder, _store_template, **{"run.register_model": "tiny-model"})


def loop_probabilities(config: cfg.ExperimentConfig, best_pt: Path) -> tuple[np.ndarray, object]:
    """best.pt through the loop's own prediction path on the val split: (probs, dataset)."""
    ds = build_dataset(config, "val")
    model = build_model(config)
    model.load_state_dict(torch.load(best_pt, weights_only=True)["model"])
    batches = BatchSettings(BatchPrep(ds, torch.device("cpu"), False), make_loss("multilabel"))
    loader = build_loader(ds, config, DistInfo(), torch.device("cpu"), train=False)
    return predict(model, loader, batches)["probs"], ds


@pytest.mark.slow
def test_logged_model_thresholds_and_serving(tiny, tmp_path, monkeypatch):
    """One test for the one trained run: under xdist each worker would train its own."""
    check_logged_model(tiny, monkeypatch)
    check_thresholds(tiny)
    check_serving(tiny, tmp_path)


def check_logged_model(tiny, monkeypatch) -> None:
    """The pyfunc gives the probabilities of best.pt through the loop; no run left active."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny.uri)
    client = MlflowClient(tiny.uri)
    assert client.get_run(tiny.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None
    (logged,) = client.search_logged_models([tiny.experiment_id])
    assert (logged.name, logged.source_run_id) == ("model", tiny.run_id)

    config = cfg.from_dict(torch.load(tiny.results_dir / "best.pt", weights_only=True)["config"])
    expected, ds = loop_probabilities(config, tiny.results_dir / "best.pt")
    images = np.stack([np.asarray(open_rgb(p)) for p in ds.image_paths])
    model = mlflow.pyfunc.load_model(f"runs:/{tiny.run_id}/model")
    table = model.predict(images)
    assert list(table.columns) == LABELS and table.shape == (50, 3)
    np.testing.assert_allclose(table.to_numpy(), expected, atol=1e-6)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1, 3)
    # The registered version is the same model; other image sizes are resized, not refused.
    registered = mlflow.pyfunc.load_model("models:/tiny-model/1")
    np.testing.assert_allclose(registered.predict(images[:2]).to_numpy(), expected[:2], atol=1e-6)
    assert registered.predict(np.zeros((1, 50, 70, 3), np.uint8)).shape == (1, 3)


def check_thresholds(tiny) -> None:
    """tables/thresholds.csv: per label, the threshold of the best F1 on the val split."""
    import pandas as pd

    table = pd.read_csv(tiny.results_dir / "tables" / "thresholds.csv")
    assert list(table["label"]) == LABELS
    probs = pd.read_csv(tiny.results_dir / "tables" / "val_predictions.csv")
    for label, threshold, f1 in zip(table["label"], table["threshold"], table["val_f1"]):
        p, y = probs[f"prob_{label}"].to_numpy(), probs[f"label_{label}"].to_numpy()
        called = p >= threshold
        tp = (called & (y == 1)).sum()
        assert f1 == pytest.approx(2 * tp / (called.sum() + y.sum()))
        for t in np.unique(p):  # no threshold does better
            c = p >= t
            assert 2 * (c & (y == 1)).sum() / (c.sum() + y.sum()) <= f1 + 1e-12


def test_best_f1_threshold_by_hand():
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.8, 0.6, 0.1])
    # Calling the top 3 positive: tp 2, F1 = 4 / (3 + 2) = 0.8, the best; halfway 0.6 / 0.1.
    assert evaluate.best_f1_threshold(labels, probs) == pytest.approx((0.35, 0.8))
    assert evaluate.best_f1_threshold(np.zeros(3), np.array([0.2, 0.3, 0.4]))[0] == 0.5


@pytest.mark.slow
def test_random_vgg16_at_96_px_on_pascal(_store_template, tmp_path, monkeypatch):
    import shutil

    tree = make_pascal_tree(tmp_path / "data")
    shutil.copy(_store_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from src.run_experiment import run

    config = cfg.load(
        REPO / "experiments" / "demo3_vgg16_pascal.toml",
        {
            "data.args.voc_dataset_dir": str(tree.voc_dir),
            "data.args.sbd_dataset_dir": str(tree.sbd_dir),
            "data.args.image_size": 96,
            "model.args.image_size": 96,
            "model.args.pretrained": False,
            "data.batch_size": 4,
            "data.num_workers": 0,
            "train.epochs": 1,
            "run.device": "cpu",
            "run.results_dir": str(tmp_path / "results"),
        },
    )
    result = run(config)
    expected, ds = loop_probabilities(config, result.results_dir / "best.pt")
    images = [np.asarray(open_rgb(e.image_path)) for e in ds.entries]  # 64 x 48 JPEGs
    model = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model")
    got = np.concatenate([model.predict(im[None]).to_numpy() for im in images])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert MlflowClient(uri).get_run(result.run_id).info.status == "FINISHED"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


def check_serving(tiny, tmp_path) -> None:
    """A real `mlflow models serve` of runs:/<id>/model answers a request with an image."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tiny.uri, "OMP_NUM_THREADS": "1"}
    # It starts `uvicorn` by name: the environment's bin folder must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"runs:/{tiny.run_id}/model",
    ]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        image = np.asarray(open_rgb(REPO / "load_dataset" / "tiny_data" / "val" / "val_003.png"))
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": image[None].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            (answer,) = json.loads(r.read())["predictions"]
    finally:
        stop_group(server)
    expected = model_package.load(f"runs:/{tiny.run_id}/model").probabilities(image[None])[0]
    assert [answer[k] for k in LABELS] == pytest.approx(expected.tolist(), abs=1e-6)


def stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), SIGKILL if it stays."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # the group is gone already
            pass
        try:
            server.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
