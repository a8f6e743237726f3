"""The command line shared by every Demo, `python -m src.run_experiment` and `python -m
src.sweep`: the flags, their parsing into a config, `main` (one-line errors, exit code 2) and
the closing report.

Each flag stores its value under the config key it sets (`--epochs 5` -> `train.epochs`), and
`load_from_args` makes the config from the experiment's TOML and them.

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
import collections
import functools
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import src.tracking as tracking
from src.config import (
    SECTIONS,
    SETNAME_PLACEHOLDER,
    ExperimentConfig,
    from_dict,
    import_object,
    read_toml,
    toml_value,
)
from src.errors import ConfigError, UserError, print_user_error
from src.interrupts import exit_code
from src.sweep.multirun import run_seeds
from src.train.experiment import RunResult, run

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
    "--alias": ("run.model_alias", str, "with --register-model: an alias of the new version"),
    "--results-dir": ("run.results_dir", from_cwd, "checkpoints (default: <repo>/results)"),
    "--download": ("data.args.download", bool, "let torchvision download the dataset"),
    "--max-batches": ("train.max_batches", int, "at most N batches per epoch (smoke runs)"),
    "--task": ("run.task", str, "train_eval, predict_on_valid or predict_on_test"),
    "--deterministic": ("run.deterministic", bool, "use deterministic algorithms only"),
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by every Demo, `python -m src.run_experiment` and `python -m src.sweep`.

    The dataset's folder flags (`--data-dir`, `--voc-dir`, ...) are not among them: a
    `FlagParser` adds those of the experiment's dataset when it parses.
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


def make_parser(default_config: str | None, description: str) -> FlagParser:
    """The flags of a training command: the experiment file (`config`: a positional, or a Demo's
    `--config` with its default), `add_config_flags`, `--resume` and `--seeds`; the dataset's
    folder flags come when it parses (`FlagParser`)."""
    parser = FlagParser(description=description)
    if default_config is None:
        parser.add_argument("config", help="experiment TOML file, e.g. experiments/demo2.toml")
    else:
        parser.add_argument("--config", default=default_config, help="experiment TOML file")
    add_config_flags(parser)
    parser.add_argument("--resume", metavar="PATH", help="a run's results folder or its last.pt")
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        metavar="SEED",
        help="run once per seed, as child runs of one parent run with mean and std",
    )
    return parser


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
        isinstance(flag, str)
        and flag.startswith("--")
        and isinstance(spec, tuple)
        and tuple(map(type, spec)) == (str, str)
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


class FlagParser(argparse.ArgumentParser):
    """An ArgumentParser that gives itself the path flags of the experiment's dataset.

    `parse_args` first reads the experiment file that the command line names (the `config`
    argument: `python -m src.run_experiment`'s positional, a Demo's `--config`), takes its
    `[data] dataset`, or the one a `--set data.dataset=...` puts in its place (the flags are
    those of the dataset that will be built), and adds that class's path flags in a group of
    their own: each stores its value under the key it overrides (`data.args.<argument>`), its
    help shows the file's value of that argument. Then it parses for real, so `--help` lists
    them; the parsed flags hold the file's tree as `toml` = (path, tree) for `load_from_args`.
    Every mistake (a flag that neither this parser nor the dataset knows, a value of the
    wrong type, an experiment file that cannot be read) ends in one line `error: ...` and
    exit code 2.
    """

    # Set once the experiment file is read: its dataset, that dataset's path flags, the tree.
    dataset: str | None = None
    path_flags: dict[str, tuple[str, str]] = {}
    toml: tuple[str, dict[str, Any]] | None = None

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        argv = sys.argv[1:] if args is None else list(args)
        try:
            if self.dataset is None:
                self._add_path_flags(argv)
            parsed, extras = self.parse_known_args(argv, namespace)
            if extras:
                raise ConfigError(self._unknown(extras))
        except ConfigError as e:
            self.exit(2, f"error: {e}\n")  # one line, as every user error; no usage block
        parsed.toml = self.toml
        return parsed

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)  # `parse_args` prints it

    def _add_path_flags(self, argv: list[str]) -> None:
        known = self._read_ahead(argv)
        if getattr(known, "config", None) is None:  # no experiment file yet, or no parse
            self.epilog = "--help after the experiment file also lists its dataset's folder flags."
            return
        tree = read_toml(known.config)
        self.toml = (str(known.config), tree)
        self.dataset = _class_path(tree, known.set, "data", "dataset")
        self.path_flags = path_flags_of(self.dataset)
        group = self.add_argument_group(
            f"folders of the dataset {self.dataset}",
            "Relative paths are resolved against the current directory; an empty value ('') "
            "leaves that folder out, where the dataset allows it.",
        )
        for flag, (arg, text) in self.path_flags.items():
            now = tree.get("data", {}).get("args", {}).get(arg)
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
                    f"{self.dataset}.path_flags declares {flag}, which is already a flag of "
                    "this command; give it another name."
                ) from None

    def _read_ahead(self, argv: list[str]) -> argparse.Namespace | None:
        """argv parsed without the path flags, which are not known yet; None if it fails."""
        argv = [a for a in argv if a not in ("-h", "--help")]
        try:
            extras = self.parse_known_args(argv)[1]
            # The unknown flags are path flags, which take one value each. Without them and
            # their values, no value is mistaken for the positional experiment file.
            unknown = {a for a in extras if a.startswith("-") and "=" not in a}
            kept, rest = [], iter(argv)
            for a in rest:
                if a in unknown:
                    next(rest, None)
                else:
                    kept.append(a)
            return self.parse_known_args(kept)[0]
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


def set_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` items as dotted-key overrides (of two for one key, the last wins)."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must have the form KEY=VALUE.")
        out[key.strip()] = toml_value(text.strip())
    return out


def _class_path(tree: dict[str, Any], set_items: list[str] | None, section: str, key: str) -> str:
    """The import path `[section] key` of the experiment: the last `--set section.key=...`,
    else the TOML's, else the default."""
    toml = tree.get(section, {}).get(key, getattr(SECTIONS[section], key))
    return str(set_overrides(set_items).get(f"{section}.{key}", toml))


# The model argument that `--no-pretrained` sets, first match wins -> its value for random
# initial weights.
NOT_PRETRAINED = {"vgginit": "random", "pretrained": False}


def load_from_args(path: str | Path, args: argparse.Namespace) -> ExperimentConfig:
    """The config of the experiment file `path` with the overrides of the parsed flags; the
    TOML as the parser read it (`args.toml`) when that is this file, else read here.

    The overrides: every flag stored under a config key (a dotted `dest`, folders already
    resolved), then what `--image-size` and `--no-pretrained` set in the classes that take it,
    then `--set KEY=VALUE`, which comes last and wins. The classes are the TOML's dataset and
    model, or those that `--set data.dataset=...` / `--set model.model=...` put in their place,
    as in `FlagParser`. `--image-size` sets image_size of the dataset (it resizes to it) and of
    the model (it sizes its linear layer by it); `--no-pretrained` the model's vgginit or
    pretrained. A flag that no class takes is an error: a flag never silently does nothing.
    """
    read, tree = getattr(args, "toml", None) or (None, {})
    if read != str(path):
        tree = read_toml(path)
    items = getattr(args, "set", None)
    dataset_path = _class_path(tree, items, "data", "dataset")
    model_path = _class_path(tree, items, "model", "model")
    out = {key: v for key, v in vars(args).items() if "." in key and v is not None}
    if getattr(args, "image_size", None) is not None:
        takers = {"data": _params(dataset_path, "dataset"), "model": _params(model_path, "model")}
        sized = {
            f"{s}.args.image_size": args.image_size for s, p in takers.items() if "image_size" in p
        }
        if not sized:
            raise ConfigError(
                f"--image-size does not apply to {dataset_path} or {model_path}: neither "
                "takes image_size."
            )
        out.update(sized)
    if getattr(args, "no_pretrained", False):
        arg = next((a for a in NOT_PRETRAINED if a in _params(model_path, "model")), None)
        if arg is None:
            raise ConfigError(
                f"--no-pretrained does not apply to the model {model_path}, which takes "
                "neither vgginit nor pretrained."
            )
        out[f"model.args.{arg}"] = NOT_PRETRAINED[arg]
    out.update(set_overrides(items))
    return from_dict(tree, out)


def main(
    argv: list[str] | None = None,
    default_config: str | None = None,
    description: str = "Run an experiment from its TOML file.",
) -> int:
    """Parse flags, run, print the outcome; user errors become one line and exit code 2."""
    args = make_parser(default_config, description).parse_args(argv)
    try:
        config = load_from_args(args.config, args)
        if args.seeds:
            if args.resume:
                raise ConfigError(
                    "--seeds and --resume cannot be combined; to go on with a stopped set of "
                    "seeds, run the same --seeds command again (without --resume)."
                )
            for seed in args.seeds:  # each child's seed, checked before the parent run starts
                config.replace(**{"run.seed": seed})
            parent_id, children = run_seeds(config, args.seeds)
            if children and children[0].experiment_id:  # rank 0 (or no torchrun)
                print(f"\nParent run of the {len(children)} seeds: {parent_id}")
                print(group_hint(config, children[0].experiment_id, parent_id))
            return 0
        result = run(config, resume=args.resume)
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt as e:  # the run said how it stopped and how to resume
        return exit_code(e)
    if result.results_dir is not None:
        report(config, result)
    return 0


def group_hint(config: ExperimentConfig, experiment_id: str, run_id: str) -> str:
    """The link to a run (or a parent run and its children) in the MLflow UI."""
    return tracking.ui_hint(tracking.tracking_uri(config.run.tracking_uri), experiment_id, run_id)


def with_interval(metrics: dict[str, float], key: str) -> str:
    """`0.957 [0.931, 0.983]`: the metric and its 95% interval (`<key>_ci_low`, `_ci_high`);
    to 4 decimals when it has none."""
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if low is None or high is None:
        return f"{metrics[key]:.4f}"
    return f"{metrics[key]:.3f} [{low:.3f}, {high:.3f}]"


def report(config: ExperimentConfig, result: RunResult) -> None:
    """The closing lines: the best epoch's figures (or the predictions'), where the files are,
    and the link to the run in the MLflow UI."""
    m = collections.defaultdict(lambda: float("nan"), result.best_metrics)
    n, k = result.classes_in_means
    over = f" (means over {n} of {k} classes: the rest lack a positive or a negative)"
    over = over if n < k else ""
    if config.run.task == "train_eval":
        print(
            f"\nBest epoch (lowest val_loss): {result.best_epoch} of {result.epochs_run}"
            + (" (stopped early)" if result.stopped_early else "")
            + f": val_loss {m['best_val_loss']:.4f}, val_auroc_mean "
            f"{with_interval(m, 'best_val_auroc_mean')}, val_ap_mean "
            f"{with_interval(m, 'best_val_ap_mean')}{over}"
        )
        print(f"Checkpoints: {result.results_dir}")
    else:
        split = "val" if config.run.task == "predict_on_valid" else "test"
        print(
            f"\n{split} predictions of the weights of epoch {result.best_epoch} "
            f"({config.run.checkpoint}): {split}_auroc_mean {m[f'{split}_auroc_mean']:.4f}, "
            f"{split}_ap_mean {m[f'{split}_ap_mean']:.4f}{over}"
        )
        print(f"Predictions and per-class tables: {result.results_dir / 'tables'}")
    print(group_hint(config, result.experiment_id, result.run_id))
