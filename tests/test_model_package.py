"""The MLflow model a finished run logs (src/serve/model_package.py): the probabilities of best.pt
through the training loop, for TinyConv on TinyData and a random VGG16 on PASCAL at 96 px; the
per-label thresholds; the registry; a real `mlflow models serve` answering a request; what the
model does with inputs other than uint8 images, through the Python API and the server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import src.serve.model_package as model_package
from load_dataset.generators.pascal_tree import make_pascal_tree
from load_dataset.utils import open_rgb
from src import config as cfg
from src import evaluate
from src.distributed import DistInfo
from src.tracking import tracking_uri_set
from src.train.build import build_dataset, build_loader, build_model
from src.train.loop import BatchPrep, BatchSettings, make_loss, predict
from tests.trained_runs import LABELS, REPO, save_tiny_model, train_tiny


@pytest.fixture(scope="module")
def tiny(_store_template, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    # No gallery of heatmaps: the model is what these tests are about.
    settings = {"run.register_model": "tiny-model", "explain.gallery": False}
    return train_tiny(folder, _store_template, **settings)


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
    """One test for the one trained run and its one server (5-10 s of imports and start-up):
    under xdist each worker would train and serve its own."""
    check_logged_model(tiny, monkeypatch)
    check_thresholds(tiny)
    with served(f"runs:/{tiny.run_id}/model", tmp_path, MLFLOW_TRACKING_URI=tiny.uri) as url:
        check_serving(tiny, url)
        check_inputs_through_the_server(tiny, url)


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
    # No input schema: the pyfunc checks its input (with one, the server casts floats to uint8).
    assert model.metadata.get_input_schema() is None
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
            # The gallery's heatmaps took 3.4 s of the run's 9.6 s; the model is the point here.
            "explain.gallery": False,
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


def wait_for(url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
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


@contextmanager
def served(model_uri: str, cwd: Path, **env: str) -> Iterator[str]:
    """A real `mlflow models serve` of `model_uri` on 127.0.0.1: its URL once /ping answers."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    # It starts `uvicorn` by name: the environment's bin folder must be on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(
        command, cwd=cwd, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)


def post(url: str, body: dict) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a JSON request to `url`/invocations."""
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:  # 4xx / 5xx: the answer is in the error
        return e.code, json.loads(e.read())


def check_serving(tiny, url: str) -> None:
    """A real `mlflow models serve` of runs:/<id>/model answers a request with an image."""
    image = np.asarray(open_rgb(REPO / "load_dataset" / "tiny_data" / "val" / "val_003.png"))
    status, body = post(url, {"inputs": image[None].tolist()})
    assert status == 200
    (answer,) = body["predictions"]
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


# ------------------------------------------------------------------ inputs other than uint8

EXPECTED = "The model takes RGB images [N, H, W, 3] of integers 0-255 (uint8)"
IMAGE = (np.arange(48).reshape(1, 4, 4, 3) * 255 // 47).astype(np.uint8)  # values 0 to 255
INTS = IMAGE.astype(np.int64)  # what a JSON request of IMAGE becomes on the server


def with_pixel(value: int) -> np.ndarray:
    ints = INTS.copy()
    ints[0, 1, 1, 2] = value
    return ints


# name: (input, the one-line error; None: the probabilities of IMAGE)
INPUTS = {
    "integers 0-255": (INTS, None),
    "floats 0-1": (
        np.array([[[[0.9, 0.99, 0.5]]]]),
        f"{EXPECTED}; got float64 [1, 1, 1, 3].",
    ),
    "whole floats 0-255": (INTS.astype(np.float64), f"{EXPECTED}; got float64 [1, 4, 4, 3]."),
    "negative integer": (with_pixel(-1), f"{EXPECTED}; got int64 values -1 to 255."),
    "integer above 255": (with_pixel(256), f"{EXPECTED}; got int64 values 0 to 256."),
    "booleans": (IMAGE > 127, f"{EXPECTED}; got bool [1, 4, 4, 3]."),
    "one image without N": (INTS[0], f"{EXPECTED}; got int64 [4, 4, 3]."),
    "4 channels": (
        np.concatenate([INTS, INTS[..., :1]], -1),
        f"{EXPECTED}; got int64 [1, 4, 4, 4].",
    ),
    "1 channel": (INTS[..., :1], f"{EXPECTED}; got int64 [1, 4, 4, 1]."),
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("input-model"))


@pytest.fixture(scope="module")
def image_probabilities(saved_model) -> list[float]:
    return mlflow.pyfunc.load_model(str(saved_model)).predict(IMAGE).to_numpy()[0].tolist()


@pytest.mark.parametrize("name", INPUTS)
def test_inputs_through_the_python_api(name, saved_model, image_probabilities):
    images, error = INPUTS[name]
    model = mlflow.pyfunc.load_model(str(saved_model))
    if error is None:
        assert model.predict(images).to_numpy()[0].tolist() == pytest.approx(image_probabilities)
    else:
        with pytest.raises(MlflowException) as refused:
            model.predict(images)
        assert refused.value.message == error


def check_inputs_through_the_server(tiny, url: str) -> None:
    """The inputs of test_inputs_through_the_python_api as JSON to `mlflow models serve`: the
    probabilities of IMAGE, or HTTP 400 and the one line, not the whole array in front of it."""
    with tracking_uri_set(tiny.uri):
        model = mlflow.pyfunc.load_model(f"runs:/{tiny.run_id}/model")
    expected = model.predict(IMAGE).to_numpy()[0].tolist()
    for name, (images, error) in INPUTS.items():
        status, body = post(url, {"inputs": images.tolist()})
        if error is None:
            assert status == 200, name
            got = [body["predictions"][0][k] for k in LABELS]
            assert got == pytest.approx(expected), name
        else:
            assert (status, body["message"]) == (400, error), name
