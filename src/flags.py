"""The command-line flags shared by every Demo, `python -m src.run_experiment` and
`python -m src.sweep`. Each flag stores its value under the config key it sets (`--epochs 5` ->
`train.epochs`), and `load_from_args` makes the config from the experiment's TOML and them.

Folder flags belong to the dataset: a dataset class declares them in its `path_flags`
attribute, `{"--voc-dir": ("voc_dataset_dir", "help text"), ...}` (flag -> (constructor
argument, help)), and `FlagParser` reads the experiment file named on the command line and
imports that file's dataset class before parsing, so that `--help` lists its flags and only
they are accepted. Every dataset that takes `data_dir` or `root` also gets `--data-dir` for it,
unless it declares `--data-dir` itself. A fork's dataset thus brings its own flags; nothing here
names a dataset. The TOML is read once: the parsed flags carry its tree on to the config.

Flags that set another argument of the dataset or of the model (`--image-size`,
`--no-pretrained`) check that the class takes it, so a flag never silently does nothing.
Relative paths given as flags are resolved against the current directory, as a shell user
expects.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from src.config import (
    SETNAME_PLACEHOLDER,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    from_dict,
    import_object,
    read_toml,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The arguments the generic `--data-dir` sets, first match wins, for datasets that do not
# declare `--data-dir` themselves (torchvision's ImageFolder, a fork's folder dataset).
DATA_DIR_ARGS = ("data_dir", "root")


def from_cwd(value: str, per_split: bool = False) -> str:
    """A folder given as a flag, resolved against the current directory; '' stays '' (that
    folder left out, where the dataset allows it); `per_split` appends `/{setname}` (a root
    whose TOML value holds it, as ImageFolder's: a folder per split under the one given)."""
    if not value:
        return ""
    path = Path(value).expanduser().resolve()
    return str(path / SETNAME_PLACEHOLDER if per_split else path)


def toml_value(text: str) -> Any:
    """A value as TOML reads it (`2` -> 2, `true` -> True); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# The flags that set one config key each: flag -> (key, type, help). A flag stores its value
# under its key, as the dataset's folder flags do (`--voc-dir` -> data.args.voc_dataset_dir);
# `bool` makes a switch that sets true.
CONFIG_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--epochs": ("train.epochs", int, "maximum number of epochs"),
    "--patience": ("train.patience", int, "early-stopping patience in epochs (on val_loss)"),
    "--batch-size": ("data.batch_size", int, "batch size (per process under torchrun)"),
    "--num-workers": ("data.num_workers", toml_value, 'DataLoader worker processes, or "auto"'),
    "--seed": ("run.seed", int, "random seed"),
    "--device": ("run.device", str, "auto, cpu, cuda, cuda:1, mps"),
    "--lr": ("optimizer.lr", float, "learning rate"),
    "--tracking-uri": ("run.tracking_uri", str, "MLflow URI (default: <repo>/mlflow.db)"),
    "--experiment-name": ("run.experiment_name", str, "MLflow experiment name"),
    "--run-name": ("run.run_name", str, "MLflow run name"),
    "--register-model": ("run.register_model", str, "a name to register the model under"),
    "--results-dir": ("run.results_dir", from_cwd, "checkpoints (default: <repo>/results)"),
    "--download": ("data.args.download", bool, "let torchvision download the dataset"),
    "--max-batches": ("train.max_batches", int, "at most N batches per epoch (smoke runs)"),
    "--task": ("run.task", str, "train_eval, predict_on_valid or predict_on_test"),
    "--deterministic": ("run.deterministic", bool, "use deterministic algorithms only"),
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every Demo, `python -m src.run_experiment` and `python -m src.sweep`.

    The dataset's folder flags (`--data-dir`, `--voc-dir`, ...) are not among them: a
    `FlagParser` adds those of the experiment's dataset when it parses (`add_path_flags`).
    """
    a = parser.add_argument
    for flag, (key, kind, text) in CONFIG_FLAGS.items():
        if kind is bool:
            a(flag, dest=key, action="store_const", const=True, help=text)
        else:
            a(flag, dest=key, type=kind, metavar=flag[2:].replace("-", "_").upper(), help=text)
    a("--image-size", type=int, help="side of the square input images (dataset and model)")
    a("--no-pretrained", action="store_true", help="VGG: random initial weights, not ImageNet's")
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
    names an argument the class does not take. The class is imported, never called.
    """
    params = _params(dataset_path, "dataset")
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    declared = getattr(import_object(dataset_path, "dataset"), "path_flags", None) or {}
    well_formed = isinstance(declared, dict) and all(
        isinstance(flag, str) and flag.startswith("--") and _is_pair_of_strings(spec)
        for flag, spec in declared.items()
    )
    if not well_formed:
        raise ConfigError(
            f"{dataset_path}.path_flags must map each '--flag' to (argument, help), both "
            f"strings; it is {declared!r}."
        )
    for flag, (arg, _) in declared.items():
        if arg not in params and not takes_any:
            raise ConfigError(
                f"{dataset_path}.path_flags gives {flag} for the argument {arg!r}, which "
                "the class does not take."
            )
    arg = next((a for a in DATA_DIR_ARGS if a in params), None)
    if "--data-dir" in declared or arg is None:
        return dict(declared)
    return {**declared, "--data-dir": (arg, "the dataset's main folder")}


def _is_pair_of_strings(spec: Any) -> bool:
    return isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(s, str) for s in spec)


def add_path_flags(parser: FlagParser, dataset_path: str, dataset_args: dict[str, Any]) -> None:
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
        now = dataset_args.get(arg)
        text = f"{text} (sets {arg}" + (f"; the experiment file has {now})" if now else ")")
        try:
            group.add_argument(
                flag,
                dest=f"data.args.{arg}",
                type=functools.partial(from_cwd, per_split=SETNAME_PLACEHOLDER in str(now)),
                metavar="DIR" if flag.endswith("-dir") else "PATH",
                help=text.replace("%", "%%"),
            )
        except argparse.ArgumentError:
            raise ConfigError(
                f"{dataset_path}.path_flags declares {flag}, which is already a flag of this "
                "command; give it another name."
            ) from None
    parser.dataset, parser.path_flags = dataset_path, flags


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that gives itself the path flags of the experiment's dataset.

    `parse_args` first reads the experiment file that the command line names (the `config`
    argument: `python -m src.run_experiment`'s positional, a Demo's `--config`), takes its
    `[data] dataset`, or the one a `--set data.dataset=...` puts in its place (the flags are
    those of the dataset that will be built), and adds that class's path flags
    (`add_path_flags`). Then it parses for real, so `--help` lists them; the parsed flags hold
    the file's tree as `toml` = (path, tree) for `load_from_args`. Every mistake (a flag that
    neither this parser nor the dataset knows, a value of the wrong type, an experiment file
    that cannot be read) ends in one line `error: ...` and exit code 2.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dataset: str | None = None
        self.path_flags: dict[str, tuple[str, str]] = {}
        self.toml: tuple[str, dict[str, Any]] | None = None

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        try:
            if self.dataset is None:
                self._add_dataset_flags(argv)
            parsed, extras = self.parse_known_args(argv, namespace)
            if extras:
                raise ConfigError(self._unknown(extras))
        except ConfigError as e:
            self.exit(2, f"error: {e}\n")  # one line, as every user error; no usage block
        parsed.toml = self.toml
        return parsed

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)  # `parse_args` prints it

    def _add_dataset_flags(self, argv: list[str]) -> None:
        known = self._read_ahead(argv)
        if getattr(known, "config", None) is None:  # no experiment file yet, or no parse
            self.epilog = "--help after the experiment file also lists its dataset's folder flags."
            return
        tree = read_toml(known.config)
        self.toml = (str(known.config), tree)
        dataset = _class_path(tree, known.set, "data", "dataset")
        add_path_flags(self, dataset, tree.get("data", {}).get("args", {}))

    def _read_ahead(self, argv: list[str]) -> argparse.Namespace | None:
        """argv parsed without the path flags, which are not known yet; None if it fails."""
        argv = [a for a in argv if a not in ("-h", "--help")]
        try:
            known, extras = self.parse_known_args(argv)
        except ConfigError:
            return None
        # The unknown flags are path flags, which take one value each. Without them and their
        # values, no value is mistaken for the positional experiment file.
        unknown = {a for a in extras if a.startswith("-") and "=" not in a}
        kept, rest = [], iter(argv)
        for a in rest:
            if a in unknown:
                next(rest, None)
            else:
                kept.append(a)
        try:
            return self.parse_known_args(kept)[0] if unknown else known
        except ConfigError:
            return None

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


def _params(path: str, what: str) -> dict[str, inspect.Parameter]:
    """The constructor arguments of the dataset or model class at `path` (imported, not
    called)."""
    try:
        return dict(inspect.signature(import_object(path, what)).parameters)
    except (TypeError, ValueError):  # not callable, or no signature: src.train.build refuses it
        return {}


def _class_path(tree: dict[str, Any], set_items: list[str] | None, section: str, key: str) -> str:
    """The import path `[section] key` of the experiment: the last `--set section.key=...`,
    else the TOML's, else the default."""
    path = tree.get(section, {}).get(key)
    for item in set_items or []:
        name, sep, text = item.partition("=")
        if sep and name.strip() == f"{section}.{key}":
            path = toml_value(text.strip())
    default = DataConfig.dataset if section == "data" else ModelConfig.model
    return str(path) if path is not None else default


def overrides_from_args(
    args: argparse.Namespace, dataset_path: str, model_path: str = ModelConfig.model
) -> dict[str, Any]:
    """Dotted-key overrides from parsed flags: every flag stored under a config key (a dotted
    `dest`, folders already resolved), then what `--image-size` and `--no-pretrained` set in
    the classes that take it, then `--set KEY=VALUE`, which comes last and wins."""
    out = {key: v for key, v in vars(args).items() if "." in key and v is not None}
    out.update(_class_flag_overrides(args, dataset_path, model_path))
    for item in getattr(args, "set", None) or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must have the form KEY=VALUE.")
        out[key.strip()] = toml_value(text.strip())
    return out


def _class_flag_overrides(
    args: argparse.Namespace, dataset_path: str, model_path: str
) -> dict[str, Any]:
    """`--image-size` sets image_size of the dataset (it resizes to it) and of the model (it
    sizes its linear layer by it); `--no-pretrained` the model's vgginit or pretrained. A flag
    that no class takes is an error: a flag never silently does nothing."""
    out: dict[str, Any] = {}
    if getattr(args, "image_size", None) is not None:
        for section, what, path in [
            ("data", "dataset", dataset_path),
            ("model", "model", model_path),
        ]:
            if "image_size" in _params(path, what):
                out[f"{section}.args.image_size"] = args.image_size
        if not out:
            raise ConfigError(
                f"--image-size does not apply to {dataset_path} or {model_path}: neither "
                "takes image_size."
            )
    if getattr(args, "no_pretrained", False):
        model = _params(model_path, "model")
        if "vgginit" in model:
            out["model.args.vgginit"] = "random"
        elif "pretrained" in model:
            out["model.args.pretrained"] = False
        else:
            raise ConfigError(
                f"--no-pretrained does not apply to the model {model_path}, which takes "
                "neither vgginit nor pretrained."
            )
    return out


def load_from_args(path: str | Path, args: argparse.Namespace) -> ExperimentConfig:
    """The config of the experiment file `path` with the overrides of the parsed flags; the
    TOML as the parser read it (`args.toml`) when that is this file, else read here.

    The dataset and model are the TOML's, or those that `--set data.dataset=...` /
    `--set model.model=...` put in their place, as in `FlagParser`.
    """
    read, tree = getattr(args, "toml", None) or (None, {})
    if read != str(path):
        tree = read_toml(path)
    items = getattr(args, "set", None)
    dataset_path = _class_path(tree, items, "data", "dataset")
    overrides = overrides_from_args(args, dataset_path, _class_path(tree, items, "model", "model"))
    return from_dict(tree, overrides)
