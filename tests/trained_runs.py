"""A short training run on the shipped TinyData in a private copy of the session's MLflow
store, for the tests of what a finished run leaves (its MLflow model, predictions)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO2 = REPO / "experiments" / "demo2_tinyconv_tinydata.toml"
LABELS = ["LabelRed", "LabelBlue", "LabelYellow"]


@dataclass
class TrainedRun:
    uri: str  # its MLflow store
    run_id: str
    experiment_id: str
    results_dir: Path


def train_tiny(folder: Path, store_template: Path, **overrides) -> TrainedRun:
    """TinyConv trained for 6 epochs (lr 0.05: the labels are learnt, AUROC > 0.9) in
    `folder`, tracked in a copy of `store_template` given as run.tracking_uri."""
    from src import config as cfg
    from src.run_experiment import run

    shutil.copy(store_template, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    settings = {
        "train.epochs": 6,
        "train.patience": 0,
        "optimizer.lr": 0.05,
        "optimizer.momentum": 0.9,
        "run.results_dir": str(folder / "results"),
        "run.device": "cpu",
        "run.tracking_uri": uri,
        **overrides,
    }
    result = run(cfg.load(DEMO2, settings))
    return TrainedRun(uri, result.run_id, result.experiment_id, result.results_dir)


def quick_tinyconv(steps: int = 60, seed: int = 0):
    """TinyConv trained in-process (no MLflow) on the shipped TinyData's training split:
    (network in eval mode, the val dataset). A few seconds' SGD: it tells the colours apart."""
    import torch

    from load_dataset.custom_tiny import TinyData
    from models.custom_models_base import TinyConv

    torch.manual_seed(seed)
    train, val = TinyData("train"), TinyData("val")
    x = torch.stack([train[i]["data"] for i in range(len(train))])
    y = torch.from_numpy(train.labels)
    net = TinyConv(n_outputs=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(net(x)["out"], y).backward()
        optimizer.step()
    return net.eval(), val


def save_tiny_model(folder: Path, thresholds=None) -> Path:
    """`quick_tinyconv` saved as the pyfunc a run logs, in the folder `folder`/model."""
    import mlflow
    import torch

    import src.serve.model_package as model_package

    net, val = quick_tinyconv()
    weights = folder / "best.pt"
    torch.save({"model": net.state_dict(), "epoch": 1}, weights)
    spec = model_package.ClassifierSpec(
        "models.custom_models_base:TinyConv", {"n_outputs": 3}, LABELS, "multilabel",
        val.input_transform, None, thresholds,
    )  # fmt: skip
    classifier = model_package.ImageClassifier(spec)
    mlflow.pyfunc.save_model(
        folder / "model", python_model=classifier, artifacts={"weights": str(weights)},
        signature=model_package.signature(LABELS), input_example=model_package.input_example(),
        pip_requirements=model_package.pip_requirements(),
    )  # fmt: skip
    return folder / "model"
