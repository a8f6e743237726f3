"""The command-line flags shared by every Demo and `python -m src.run_experiment`, turned into
dotted-key overrides of an experiment's TOML (`--epochs 5` -> `train.epochs = 5`).

Folder flags belong to the dataset: a dataset class declares them in its `path_flags`
attribute, `{"--voc-dir": ("voc_dataset_dir", "help text"), ...}` (flag -> (constructor
argument, help)), and `FlagParser` reads the experiment file named on the command line before
parsing, so that `--help` lists the flags of that file's dataset and only they are accepted.
Every dataset that takes `data_dir` or `root` also gets `--data-dir` for it, unless it
declares `--data-dir` itself. A fork's dataset thus brings its own flags; nothing here names
a dataset.

Flags that set another argument of the dataset or of the model (`--image-size`,
`--no-pretrained`) check that the class takes it, so a flag never silently does nothing.
Relative paths given as flags are resolved against the current directory, as a shell user
expects.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

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

# A path flag stores its value under the key it overrides: `--voc-dir` -> data.args.voc_dataset_dir.
PATH_FLAG_DEST = "data.args."
# The arguments the generic `--data-dir` sets, first match wins, for datasets that do not
# declare `--data-dir` themselves (torchvision's ImageFolder, a fork's folder dataset).
DATA_DIR_ARGS = ("data_dir", "root")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every Demo and by `python -m src.run_experiment`.

    The dataset's folder flags (`--data-dir`, `--voc-dir`, ...) are not among them: a
    `FlagParser` adds those of the experiment's dataset when it parses (`add_path_flags`).
    """
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
        "--register-model",
        metavar="NAME",
        help="also register the run's MLflow model as a new version of NAME (models:/NAME/<v>)",
    )
    a(
        "--results-dir",
        help="folder for checkpoints and outputs (default: <repo>/results)",
    )
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


def path_flags_of(dataset_path: str) -> dict[str, tuple[str, str]]:
    """The path flags of the dataset class at `dataset_path`: {flag: (argument, help)}.

    The class's own `path_flags`, plus `--data-dir` for its `data_dir` or `root` argument
    when it declares no `--data-dir` itself. ConfigError when the declaration is malformed or
    names an argument the class does not take.
    """
    read = _read_without_importing(dataset_path)
    if read is None:
        cls = import_object(dataset_path, "dataset")
        signature = _signature(cls)
        params = set(signature)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        declared = getattr(cls, "path_flags", None) or {}
    else:
        declared, params, takes_any = read
    if not isinstance(declared, dict):
        raise ConfigError(
            f"{dataset_path}.path_flags must be a dict {{'--flag': (argument, help)}}."
        )
    flags: dict[str, tuple[str, str]] = {}
    for flag, spec in declared.items():
        if not (
            isinstance(flag, str)
            and flag.startswith("--")
            and isinstance(spec, tuple)
            and len(spec) == 2
            and all(isinstance(s, str) for s in spec)
        ):
            raise ConfigError(
                f"{dataset_path}.path_flags must map each '--flag' to (argument, help), "
                f"both strings; {flag!r}: {spec!r} does not."
            )
        if spec[0] not in params and not takes_any:
            raise ConfigError(
                f"{dataset_path}.path_flags gives {flag} for the argument {spec[0]!r}, which "
                "the class does not take."
            )
        flags[flag] = spec
    if "--data-dir" not in flags:
        arg = next((a for a in DATA_DIR_ARGS if a in params), None)
        if arg is not None:
            flags["--data-dir"] = (arg, "the dataset's main folder")
    return flags


def _read_without_importing(dataset_path: str) -> tuple[Any, set[str], bool] | None:
    """(path_flags, constructor argument names, takes **kwargs) of a dataset class read from
    its source, without importing its module (torch and torchvision take seconds): when the
    class itself defines `__init__` and `path_flags`, as a literal. None when it does not
    (inherited, computed, a compiled module): the caller imports the class."""
    module_name, _, name = dataset_path.partition(":")
    try:
        spec = importlib.util.find_spec(module_name)
        source = Path(spec.origin).read_text() if spec and spec.origin else None
        tree = ast.parse(source) if source else None
    except (ImportError, ValueError, OSError, SyntaxError, UnicodeDecodeError):
        return None
    body = next(
        (
            n.body
            for n in getattr(tree, "body", [])
            if isinstance(n, ast.ClassDef) and n.name == name
        ),
        None,
    )
    if body is None:
        return None
    init = next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return None
    a = init.args
    params = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs][1:]}
    declared: Any = None
    for node in body:
        target = node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        if isinstance(target, ast.Name) and target.id == "path_flags" and node.value is not None:
            try:
                declared = ast.literal_eval(node.value)
            except ValueError:
                return None
    if declared is None:  # maybe inherited: only the class itself knows
        return None
    return declared, params, a.kwarg is not None


def add_path_flags(
    parser: FlagParser, dataset_path: str, dataset_args: dict[str, Any] | None = None
) -> None:
    """Give `parser` the path flags of the dataset at `dataset_path`, in a group of their own.

    Each one stores its value under the key it overrides (`data.args.<argument>`); its help
    shows the experiment file's value of that argument (`dataset_args`), when it has one.
    """
    flags = path_flags_of(dataset_path)
    group = parser.add_argument_group(
        f"folders of the dataset {dataset_path}",
        "Relative paths are resolved against the current directory; an empty value ('') "
        "leaves that folder out, where the dataset allows it.",
    )
    for flag, (arg, text) in flags.items():
        now = (dataset_args or {}).get(arg)
        text = f"{text} (sets {arg}" + (f"; the experiment file has {now})" if now else ")")
        try:
            group.add_argument(
                flag,
                dest=PATH_FLAG_DEST + arg,
                metavar="DIR" if flag.endswith("-dir") else "PATH",
                help=text.replace("%", "%%"),
            )
        except argparse.ArgumentError:
            raise ConfigError(
                f"{dataset_path}.path_flags declares {flag}, which is already a flag of this "
                "command; give it another name."
            ) from None
    parser.dataset, parser.path_flags = dataset_path, flags


class _ReadAheadFailed(Exception):
    """The command line does not parse, even leaving the path flags aside."""


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that gives itself the path flags of the experiment's dataset.

    `parse_args` first reads the experiment file that the command line names (the `config`
    argument: `python -m src.run_experiment`'s positional, a Demo's `--config`), takes its
    `[data] dataset`, or the one a `--set data.dataset=...` puts in its place (the flags are
    those of the dataset that will be built), and adds that class's path flags
    (`add_path_flags`). Then it parses for real, so `--help` lists them. A flag that neither
    this parser nor the dataset knows, and an experiment file that cannot be read, end in one
    line `error: ...` and exit code 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataset: str | None = None
        self.path_flags: dict[str, tuple[str, str]] = {}
        self._reading_ahead = False

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        if self.dataset is None:
            try:
                self._add_dataset_flags(argv)
            except ConfigError as e:
                self.exit(2, f"error: {e}\n")
        parsed, extras = self.parse_known_args(argv, namespace)
        if extras:
            self.exit(2, f"error: {self._unknown(extras)}\n")
        return parsed

    def error(self, message: str) -> NoReturn:
        if self._reading_ahead:
            raise _ReadAheadFailed(message)
        super().error(message)

    def _add_dataset_flags(self, argv: list[str]) -> None:
        known = self._read_ahead(argv)
        config = getattr(known, "config", None)
        if config is None:  # no experiment file yet (or argv does not parse): no path flags
            self.epilog = "--help after the experiment file also lists its dataset's folder flags."
            return
        tree = read_toml(config)
        dataset = _class_path(tree, getattr(known, "set", None), "data", "dataset")
        add_path_flags(self, dataset, tree.get("data", {}).get("args", {}))

    def _read_ahead(self, argv: list[str]) -> argparse.Namespace | None:
        """argv parsed without the path flags, which are not known yet; None if it fails."""
        argv = [a for a in argv if a not in ("-h", "--help")]
        self._reading_ahead = True
        try:
            known, extras = self.parse_known_args(argv)
            # The unknown flags are path flags, which take one value each. Without them and
            # their values, no value is mistaken for the positional experiment file.
            unknown = {a for a in extras if a.startswith("-") and "=" not in a}
            if unknown:
                kept, rest = [], iter(argv)
                for a in rest:
                    if a in unknown:
                        next(rest, None)
                    else:
                        kept.append(a)
                known, _ = self.parse_known_args(kept)
            return known
        except _ReadAheadFailed:
            return None
        finally:
            self._reading_ahead = False

    def _unknown(self, extras: list[str]) -> str:
        flag = next((a.split("=", 1)[0] for a in extras if a.startswith("-")), None)
        if flag is None:
            return f"unrecognized arguments: {' '.join(extras)}"
        if self.dataset is None:
            return f"{flag} is not a flag of this command; see --help."
        own = ", ".join(self.path_flags) or "none"
        return (
            f"{flag} is not a flag of this command and does not apply to the dataset "
            f"{self.dataset} (its path flags: {own}); see --help."
        )


def _signature(cls: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # not callable, or no signature: src.config refuses it
        return {}


def _params(path: str, what: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the dataset or model class at `path`."""
    return _signature(import_object(path, what))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string


def _class_path(tree: dict[str, Any], set_items: list[str] | None, section: str, key: str) -> str:
    """The import path `[section] key` of the experiment: the last `--set section.key=...`,
    else the TOML's, else the default."""
    path = tree.get(section, {}).get(key)
    for item in set_items or []:
        name, sep, text = item.partition("=")
        if sep and name.strip() == f"{section}.{key}":
            path = _parse_value(text.strip())
    default = DataConfig.dataset if section == "data" else ModelConfig.model
    return str(path) if path is not None else default


# Flags that set one config key as they are given.
SIMPLE_FLAGS = {
    "epochs": "train.epochs",
    "patience": "train.patience",
    "batch_size": "data.batch_size",
    "seed": "run.seed",
    "device": "run.device",
    "lr": "optimizer.lr",
    "tracking_uri": "run.tracking_uri",
    "experiment_name": "run.experiment_name",
    "run_name": "run.run_name",
    "register_model": "run.register_model",
    "task": "run.task",
    "max_batches": "train.max_batches",
}


def overrides_from_args(
    args: argparse.Namespace,
    dataset_path: str,
    model_path: str = ModelConfig.model,
    dataset_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dotted-key overrides from parsed flags; path flags are resolved against the cwd.

    Path flags arrive under the key they set (`data.args.voc_dataset_dir`, see
    `add_path_flags`); an empty value stays empty, and a folder whose TOML value holds
    `{setname}` (ImageFolder's root) gets `/{setname}` appended. `--image-size` and
    `--no-pretrained` check that the class takes the argument they set, so a flag never
    silently does nothing. `--set KEY=VALUE` comes last and wins.
    """
    out = {
        key: getattr(args, a)
        for a, key in SIMPLE_FLAGS.items()
        if getattr(args, a, None) is not None
    }
    if getattr(args, "num_workers", None) is not None:
        nw = args.num_workers
        out["data.num_workers"] = nw if nw == "auto" else _parse_value(nw)
    if getattr(args, "results_dir", None):
        out["run.results_dir"] = str(Path(args.results_dir).expanduser().resolve())
    if getattr(args, "deterministic", False):
        out["run.deterministic"] = True
    out.update(_path_overrides(args, dataset_args or {}))
    if getattr(args, "download", False):
        out["data.args.download"] = True
    if getattr(args, "image_size", None) is not None:
        out.update(_image_size_overrides(args.image_size, dataset_path, model_path))
    if getattr(args, "no_pretrained", False):
        out.update(_no_pretrained_override(model_path))
    for item in getattr(args, "set", []) or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must have the form KEY=VALUE.")
        out[key.strip()] = _parse_value(text.strip())
    return out


def _path_overrides(args: argparse.Namespace, dataset_args: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in vars(args).items():
        if not key.startswith(PATH_FLAG_DEST) or value is None:
            continue
        # An empty value (--sbd-dir '') leaves that part out, where the dataset allows it.
        path = str(Path(value).expanduser().resolve()) if value else ""
        if path and SETNAME_PLACEHOLDER in str(dataset_args.get(key[len(PATH_FLAG_DEST) :], "")):
            path = str(Path(path) / SETNAME_PLACEHOLDER)  # ImageFolder: a folder per split
        out[key] = path
    return out


def _image_size_overrides(size: int, dataset_path: str, model_path: str) -> dict[str, int]:
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
    return dict.fromkeys(targets, size)


def _no_pretrained_override(model_path: str) -> dict[str, Any]:
    params = _params(model_path, "model")
    if "vgginit" in params:
        return {"model.args.vgginit": "random"}
    if "pretrained" in params:
        return {"model.args.pretrained": False}
    raise ConfigError(
        f"--no-pretrained does not apply to the model {model_path}, which takes neither "
        "vgginit nor pretrained."
    )


def load_from_args(path: str | Path, args: argparse.Namespace) -> ExperimentConfig:
    """`load` with the overrides given by the shared command-line flags.

    The dataset and model are the TOML's, or those that `--set data.dataset=...` /
    `--set model.model=...` put in their place, as in `FlagParser`.
    """
    tree = read_toml(path)
    items = getattr(args, "set", None)
    dataset_path = _class_path(tree, items, "data", "dataset")
    model_path = _class_path(tree, items, "model", "model")
    dataset_args = tree.get("data", {}).get("args", {})
    return load(path, overrides_from_args(args, dataset_path, model_path, dataset_args))
