"""The experiment config: frozen dataclasses, loaded from a TOML file plus command-line flags.

An experiment is one TOML file in `experiments/` with the sections `[run]`, `[data]`
(+ `[data.args]`), `[model]` (+ `[model.args]`), `[optimizer]` and `[train]`. Every key has a
default below, so a TOML names only what differs. Unknown keys and values of the wrong type are
errors that name the key. Relative paths in a TOML file are resolved against the repository
root; relative paths given as flags are resolved against the current directory, as a shell
user expects.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent

TASKS = ("train_eval", "predict_on_valid", "predict_on_test")
PROBLEMS = ("multilabel", "multiclass")
AMP_MODES = ("off", "bf16", "fp16")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it and says what to do."""


@dataclass(frozen=True)
class RunConfig:
    experiment_name: str = "default"
    run_name: str = "run"
    task: str = "train_eval"
    use_test_set: bool = False
    seed: int = 0
    device: str = "auto"
    results_dir: str = "results"
    deterministic: bool = False
    tracking_uri: str = ""
    checkpoint: str = ""


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "load_dataset.custom_tiny:TinyData"
    task: str = "multilabel"
    batch_size: int = 16
    num_workers: int | str = 0
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "models.custom_models_base:TinyConv"
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "SGD"
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 1e-7


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    patience: int = 15
    amp: str = "off"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    max_batches: int = 0  # at most this many batches per epoch (smoke runs); 0 = all


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as nested plain dicts (the TOML structure)."""
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'run.seed': 0, 'data.args.data_dir': '/x'}."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys changed, e.g. `cfg.replace(**{'run.seed': 3})`."""
        tree = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(tree, key, value)
        return from_dict(tree, base_dir=REPO_ROOT)


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise ConfigError(f"Config key '{key}' does not exist: '{part}' is not a section.")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _is_path_key(key: str) -> bool:
    return key == "root" or key.endswith("_dir") or key.endswith("_path")


def _resolve_path(value: Any, base_dir: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str((base_dir / value).resolve())
    if isinstance(value, str) and value:
        return str(Path(value).expanduser())
    return value


def _check_type(section: str, key: str, value: Any, expected: Any) -> Any:
    """Return `value` if it fits the annotation `expected` (a string, as written above)."""
    name = f"[{section}] {key}"
    expected = str(expected)
    if expected == "bool":
        ok = isinstance(value, bool)
    elif expected == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected == "str":
        ok = isinstance(value, str)
    elif expected == "int | str":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or value == "auto"
    elif expected == "dict":
        ok = isinstance(value, dict)
    else:  # pragma: no cover - a new field type must be added here
        raise TypeError(f"unhandled config type {expected}")
    if not ok:
        shown = 'int or "auto"' if expected == "int | str" else expected
        raise ConfigError(
            f"Config key {name} must be of type {shown}, "
            f"got {value!r} ({type(value).__name__}); fix it in the TOML or on the command line."
        )
    return value


def from_dict(tree: dict[str, Any], base_dir: Path = REPO_ROOT) -> ExperimentConfig:
    """Validate a nested dict (the TOML structure) into an ExperimentConfig.

    Relative paths (`run.results_dir`, dataset args named `root`, `*_dir`, `*_path`) are
    resolved against `base_dir`.
    """
    unknown = set(tree) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"Unknown config section [{sorted(unknown)[0]}]; allowed sections are "
            f"{', '.join('[' + s + ']' for s in SECTIONS)}."
        )
    sections = {}
    for section, cls in SECTIONS.items():
        values = dict(tree.get(section, {}))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ConfigError(
                    f"Unknown config key [{section}] {key}; allowed keys are "
                    f"{', '.join(sorted(fields))}."
                )
        for key, value in values.items():
            values[key] = _check_type(section, key, value, fields[key].type)
        if "args" in values:
            values["args"] = {
                k: (_resolve_path(v, base_dir) if _is_path_key(k) else v)
                for k, v in values["args"].items()
            }
        if section == "run":
            for key in ("results_dir", "checkpoint"):
                values[key] = _resolve_path(values.get(key, fields[key].default), base_dir)
        sections[section] = cls(**values)
    config = ExperimentConfig(**sections)
    _check_choices(config)
    return config


def _check_choices(config: ExperimentConfig) -> None:
    choices = [
        ("run", "task", config.run.task, TASKS),
        ("data", "task", config.data.task, PROBLEMS),
        ("train", "amp", config.train.amp, AMP_MODES),
        ("optimizer", "name", config.optimizer.name, ("SGD", "Adam", "AdamW")),
    ]
    for section, key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(
                f"Config key [{section}] {key} = {value!r} is not one of {', '.join(allowed)}."
            )
    for section, key, value in [
        ("data", "batch_size", config.data.batch_size),
        ("train", "epochs", config.train.epochs),
    ]:
        if value < 1:
            raise ConfigError(f"Config key [{section}] {key} must be at least 1, got {value}.")
    if config.train.patience < 0:
        raise ConfigError("Config key [train] patience must be 0 or more.")
    if config.train.max_batches < 0:
        raise ConfigError("Config key [train] max_batches must be 0 (all batches) or more.")
    if isinstance(config.data.num_workers, int) and config.data.num_workers < 0:
        raise ConfigError('Config key [data] num_workers must be 0 or more, or "auto".')
    if config.run.task == "predict_on_test" and not config.run.use_test_set:
        raise ConfigError(
            "task = 'predict_on_test' needs use_test_set = true in [run]: the test split is "
            "kept out of every run unless the config asks for it."
        )
    for section, path in [("data", config.data.dataset), ("model", config.model.model)]:
        if ":" not in path:
            raise ConfigError(
                f"Config key [{section}] {'dataset' if section == 'data' else 'model'} = "
                f"{path!r} must be an import path of the form 'package.module:ClassName'."
            )


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass a TOML file from experiments/.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML: {e}.") from None


def import_object(path: str, what: str) -> Any:
    """Import 'package.module:Name' and return the object; a clear ConfigError otherwise."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"The {what} '{path}' cannot be imported: module {e.name!r} not found; "
            "check the import path in the config."
        ) from None
    if not hasattr(module, attr):
        raise ConfigError(
            f"The {what} '{path}' does not exist: module '{module_name}' has no '{attr}'."
        )
    return getattr(module, attr)


# ---------------------------------------------------------------- command line


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
) -> dict[str, Any]:
    """Dotted-key overrides from parsed flags; path flags are resolved against the cwd.

    Flags that set a dataset or model argument (`--data-dir`, `--image-size`,
    `--no-pretrained`, ...) check that the class takes it, so a flag never silently does
    nothing.
    """
    out: dict[str, Any] = {}
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
        if not value:
            continue
        params = _params(dataset_path, "dataset")
        target = next((p for p in arg_names if p in params), None)
        if target is None:
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to the dataset {dataset_path}, "
                f"which takes none of {', '.join(arg_names)}."
            )
        out[f"data.args.{target}"] = str(Path(value).expanduser().resolve())
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


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML experiment, apply dotted-key overrides, validate and resolve it."""
    path = Path(path)
    tree = read_toml(path)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return from_dict(tree, base_dir=REPO_ROOT)


def load_from_args(path: str | Path, args: argparse.Namespace) -> ExperimentConfig:
    """`load` with the overrides given by the shared command-line flags."""
    tree = read_toml(path)
    dataset_path = tree.get("data", {}).get("dataset", DataConfig.dataset)
    model_path = tree.get("model", {}).get("model", ModelConfig.model)
    return load(path, overrides_from_args(args, dataset_path, model_path))


def to_toml(config: ExperimentConfig) -> str:
    """The resolved config as TOML text (stored with every run)."""
    lines: list[str] = []
    for section, values in config.to_dict().items():
        lines.append(f"[{section}]")
        nested = {}
        for key, value in values.items():
            if isinstance(value, dict):
                nested[key] = value
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, table in nested.items():
            lines.append(f"[{section}.{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"Config value {value!r} cannot be written as TOML.")
