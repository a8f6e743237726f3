"""The command-line flags shared by every Demo and `python -m src.run_experiment`, turned into
dotted-key overrides of an experiment's TOML (`--epochs 5` -> `train.epochs = 5`).

Flags that set an argument of the dataset or the model (`--data-dir`, `--image-size`,
`--no-pretrained`, ...) check that the class takes it, so a flag never silently does nothing.
Relative paths given as flags are resolved against the current directory, as a shell user
expects.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any

from src.config import (
    SETNAME_PLACEHOLDER,
    TASKS,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    import_object,
    load,
    read_toml,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every Demo and by `python -m src.run_experiment`."""
    a = parser.add_argument
    a("--epochs", type=int, help="maximum number of epochs")
    a("--patience", type=int, help="early-stopping patience in epochs (on val_loss)")
    a("--batch-size", type=int, help="batch size (per process under torchrun)")
    a("--num-workers", help='DataLoader worker processes, or "auto"')
    a("--seed", type=int, help="random seed")
    a("--device", help="auto, cpu, cuda, cuda:1, mps")
    a("--lr", type=float, help="learning rate")
    a(
        "--tracking-uri",
        help="MLflow tracking URI (default: sqlite:///<repo>/mlflow.db)",
    )
    a("--experiment-name", help="MLflow experiment name")
    a("--run-name", help="MLflow run name")
    a(
        "--results-dir",
        help="folder for checkpoints and outputs (default: <repo>/results)",
    )
    a("--data-dir", help="the dataset's main folder (TinyData folder, VOC root, ...)")
    a("--voc-dir", help="PASCAL only: the folder holding VOCdevkit/ (default data/voc)")
    a(
        "--sbd-dir",
        help="PASCAL only: the SBD folder (holds img/, cls/, train_noval.txt)",
    )
    a("--cache-dir", help="folder for the dataset's preprocessed cache")
    a("--download", action="store_true", help="let torchvision download the dataset")
    a("--image-size", type=int, help="side of the square input images (dataset and model)")
    a(
        "--no-pretrained",
        action="store_true",
        help="VGG models: random initial weights instead of ImageNet-pretrained ones",
    )
    a(
        "--max-batches",
        type=int,
        help="at most N batches per epoch, in training and validation (smoke runs)",
    )
    a("--task", choices=TASKS, help="train_eval, predict_on_valid or predict_on_test")
    a("--deterministic", action="store_true", help="use deterministic algorithms only")
    a(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set model.args.conv_type=512to64_1x1",
    )


_DATA_DIR_ARGS = ("data_dir", "voc_dataset_dir", "root")


def _params(path: str, what: str) -> set[str]:
    """The constructor arguments of the dataset or model class at `path`."""
    return set(inspect.signature(import_object(path, what)).parameters)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def overrides_from_args(
    args: argparse.Namespace,
    dataset_path: str,
    model_path: str = ModelConfig.model,
    dataset_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dotted-key overrides from parsed flags; path flags are resolved against the cwd.

    Flags that set a dataset or model argument (`--data-dir`, `--image-size`,
    `--no-pretrained`, ...) check that the class takes it, so a flag never silently does
    nothing.
    """
    out: dict[str, Any] = {}
    dataset_args = dataset_args or {}
    simple = {
        "epochs": "train.epochs",
        "patience": "train.patience",
        "batch_size": "data.batch_size",
        "seed": "run.seed",
        "device": "run.device",
        "lr": "optimizer.lr",
        "tracking_uri": "run.tracking_uri",
        "experiment_name": "run.experiment_name",
        "run_name": "run.run_name",
        "task": "run.task",
        "max_batches": "train.max_batches",
    }
    for attr, key in simple.items():
        if getattr(args, attr, None) is not None:
            out[key] = getattr(args, attr)
    if getattr(args, "num_workers", None) is not None:
        nw = args.num_workers
        out["data.num_workers"] = nw if nw == "auto" else _parse_value(nw)
    if getattr(args, "results_dir", None):
        out["run.results_dir"] = str(Path(args.results_dir).expanduser().resolve())
    if getattr(args, "deterministic", False):
        out["run.deterministic"] = True
    for flag, arg_names in [
        ("data_dir", _DATA_DIR_ARGS),
        ("voc_dir", ("voc_dataset_dir",)),
        ("sbd_dir", ("sbd_dataset_dir",)),
        ("cache_dir", ("cache_dir",)),
    ]:
        value = getattr(args, flag, None)
        if value is None:
            continue
        # An empty value (--sbd-dir '') leaves that part out, where the dataset allows it.
        path = str(Path(value).expanduser().resolve()) if value else ""
        params = _params(dataset_path, "dataset")
        target = next((p for p in arg_names if p in params), None)
        if target is None:
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to the dataset {dataset_path}, "
                f"which takes none of {', '.join(arg_names)}."
            )
        if path and SETNAME_PLACEHOLDER in str(dataset_args.get(target, "")):
            path = str(Path(path) / SETNAME_PLACEHOLDER)  # ImageFolder: a folder per split
        out[f"data.args.{target}"] = path
    if getattr(args, "download", False):
        out["data.args.download"] = True
    if getattr(args, "image_size", None) is not None:
        # The dataset resizes to it and the model sizes its linear layer by it: set both.
        targets = [
            f"{section}.args.image_size"
            for section, path, what in [
                ("data", dataset_path, "dataset"),
                ("model", model_path, "model"),
            ]
            if "image_size" in _params(path, what)
        ]
        if not targets:
            raise ConfigError(
                f"--image-size does not apply to {dataset_path} or {model_path}: neither takes "
                "image_size."
            )
        out.update(dict.fromkeys(targets, args.image_size))
    if getattr(args, "no_pretrained", False):
        params = _params(model_path, "model")
        if "vgginit" in params:
            out["model.args.vgginit"] = "random"
        elif "pretrained" in params:
            out["model.args.pretrained"] = False
        else:
            raise ConfigError(
                f"--no-pretrained does not apply to the model {model_path}, which takes neither "
                "vgginit nor pretrained."
            )
    for item in getattr(args, "set", []) or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must have the form KEY=VALUE.")
        out[key.strip()] = _parse_value(text.strip())
    return out


def load_from_args(path: str | Path, args: argparse.Namespace) -> ExperimentConfig:
    """`load` with the overrides given by the shared command-line flags."""
    tree = read_toml(path)
    dataset_path = tree.get("data", {}).get("dataset", DataConfig.dataset)
    model_path = tree.get("model", {}).get("model", ModelConfig.model)
    dataset_args = tree.get("data", {}).get("args", {})
    return load(path, overrides_from_args(args, dataset_path, model_path, dataset_args))
