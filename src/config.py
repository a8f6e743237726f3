"""The experiment config: frozen dataclasses, loaded from a TOML file plus overrides.

An experiment is one TOML file in `experiments/` with the sections `[run]`, `[data]`
(+ `[data.args]`), `[model]` (+ `[model.args]`), `[optimizer]`, `[train]` and `[explain]`.
Every key has a default below, so a TOML names only what differs. Unknown keys and values of
the wrong type are errors that name the key. Relative paths in a TOML file are resolved against
the repository root. Command-line flags become dotted-key overrides in `src/cli.py`.

A config as a run stores it (`to_dict`: its params, config.toml, last.pt, a sweep's best config)
holds a path inside the repository relative to it, so that a clone moved or copied elsewhere
reads it as a path of its own: as it is where a relative path is read against the repository
(`_repo_relative`), else after REPO_PLACEHOLDER (`labels_csv`, read against the data folder).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from src.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent

AMP_MODES = ("off", "bf16", "fp16")
# 'package.module:ClassName', the form of every class a config names.
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
# In a string of [data.args], replaced by the split's name ("train", "val", "test"); a dataset
# whose arguments hold it is called without the split as first argument (ImageFolder).
SETNAME_PLACEHOLDER = "{setname}"
# At the start of a string of the config, the repository's folder ("{repo}/data/labels.csv").
REPO_PLACEHOLDER = "{repo}"


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
    # A tracking server that has not answered for server_wait_s: "continue" (say so once,
    # keep the metrics, send them when it is back) or "stop" (one-line error).
    server_unreachable: str = "continue"
    server_wait_s: float = 60.0
    # Without a terminal (nohup, sbatch, a log file): a training progress line this often.
    progress_every_s: float = 30.0
    # false: a run that FINISHED deletes its last.pt (optimizer state included, twice the
    # size of best.pt); it can then not be trained longer, best.pt still predicts.
    keep_last_pt: bool = True
    # A name: the run's MLflow model (runs:/<run id>/model) is also registered under it in
    # the model registry, as a new version (models:/<name>/<version>). "" = not registered.
    register_model: str = ""
    # With register_model: an alias of the registered version (models:/<name>@<alias>), moved
    # to each new version registered with it, e.g. "candidate". "" = none.
    model_alias: str = ""
    # false: no MLflow model at the end (a sweep's many trials, a quick check); best.pt is
    # then logged as the run's artifact checkpoint/best.pt.
    log_model: bool = True
    # The machine's CPU, memory and GPU use as the run's system metrics (system/...; every
    # 10 s, MLflow's MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), shown in its System metrics tab.
    system_metrics: bool = True


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "load_dataset.custom_tiny:TinyData"
    # "multilabel" (sigmoid + BCE, several labels per image) or "multiclass" (softmax + CE).
    # Called `task` before; that key is still read (with a note), see `_rename_keys`.
    problem: str = "multilabel"
    batch_size: int = 16
    num_workers: int | str = 0
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    model: str = "models.custom_models_base:TinyConv"
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "SGD"  # a name of src/train/build.py's OPTIMIZERS table
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 1e-7
    # A name of src/train/build.py's SCHEDULERS table: "none", "cosine" (over train.epochs) or
    # "step" (every step_size epochs).
    scheduler: str = "none"
    step_size: int = 30  # "step": epochs between learning-rate decays
    gamma: float = 0.1  # "step": factor per decay


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
class ExplainConfig:
    # The end-of-run picture plots/explanations.png: `gallery_images` validation images with
    # the heatmap of each true class, and plots/errors/<label>.png: each class's most confident
    # false positives and negatives (src/serve/explain.py); gallery = false leaves both out.
    gallery: bool = True
    gallery_images: int = 4
    cam: str = "hirescam"  # "hirescam" or "gradcam"
    # The layer the heatmaps look at, by module name (e.g. "features.28"); "" = the last
    # nn.Conv2d of the model. Stored with the MLflow model, used by src.serve.predict --explain.
    target_layer: str = ""


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as nested plain dicts (the TOML structure), as a run stores it: a path
        inside the repository relative to it."""
        return _map_strings(dataclasses.asdict(self), _stored_path)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'run.seed': 0, 'data.args.data_dir': '/x'}."""
        return flatten(self.to_dict())

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """A copy with dotted keys changed, e.g. `cfg.replace(**{'run.seed': 3})`."""
        return from_dict(self.to_dict(), dotted)


# Section name -> its dataclass: {"run": RunConfig, "data": DataConfig, ...}.
SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(ExperimentConfig)}


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


def _repo_relative(key: str) -> bool:
    """Whether `from_dict` reads a relative path at the dotted `key` against the repository."""
    _, *rest = key.split(".")
    if len(rest) == 2 and rest[0] == "args":
        return rest[1] == "root" or rest[1].endswith(("_dir", "_path"))
    return key in ("run.results_dir", "run.checkpoint")


def _map_strings(value: Any, change: Callable[[str, str], str], key: str = "") -> Any:
    """`value` (a config tree, or a value at the dotted `key`) with each string s at a key k
    replaced by change(k, s)."""
    if isinstance(value, dict):
        return {k: _map_strings(v, change, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, change, key + "[]") for v in value]
    return change(key, value) if isinstance(value, str) else value


def _stored_path(key: str, value: str) -> str:
    path = Path(value)
    if not (path.is_absolute() and path.is_relative_to(REPO_ROOT)):
        return value
    inside = path.relative_to(REPO_ROOT).as_posix()
    return inside if _repo_relative(key) else f"{REPO_PLACEHOLDER}/{inside}"


def _expanded_path(key: str, value: str) -> str:
    head, _, rest = value.partition("/")
    return str(REPO_ROOT / rest) if head == REPO_PLACEHOLDER else value


def _resolve_path(value: Any, base_dir: Path) -> Any:
    if not (isinstance(value, str) and value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


# The field types of the sections above, as written there -> the Python types a value may
# have ("int | str": an int or "auto").
TYPES = {
    "bool": bool,
    "int": int,
    "float": (int, float),
    "str": str,
    "int | str": int,
    "dict": dict,
}


def _check_type(section: str, key: str, value: Any, expected: Any) -> Any:
    """Return `value` if it fits the annotation `expected` (a string, as written above)."""
    expected = str(expected)
    ok = isinstance(value, TYPES[expected]) and (expected == "bool" or not isinstance(value, bool))
    if not (ok or (expected == "int | str" and value == "auto")):
        shown = 'int or "auto"' if expected == "int | str" else expected
        raise ConfigError(
            f"Config key [{section}] {key} must be of type {shown}, "
            f"got {value!r} ({type(value).__name__}); fix it in the TOML or on the command line."
        )
    if isinstance(value, int) and not -(2**63) <= value < 2**63:  # what a TOML file holds
        raise ConfigError(f"Config key [{section}] {key} = {value} is beyond 64-bit integers.")
    return float(value) if expected == "float" else value


def from_dict(
    tree: dict[str, Any], overrides: dict[str, Any] | None = None, base_dir: Path = REPO_ROOT
) -> ExperimentConfig:
    """Validate a nested dict (the TOML structure, left as it is) with dotted-key overrides
    (`{"train.epochs": 5}`) into an ExperimentConfig.

    Relative paths (`run.results_dir`, dataset args named `root`, `*_dir`, `*_path`) are
    resolved against `base_dir`; REPO_PLACEHOLDER is the repository's folder.
    """
    tree = copy.deepcopy(tree)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    tree = _map_strings(tree, _expanded_path)
    _rename_keys(tree)
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
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(
                    f"Unknown config key [{section}] {key}; allowed keys are "
                    f"{', '.join(sorted(fields))}."
                )
            values[key] = _check_type(section, key, value, fields[key].type)
        for k, v in values.get("args", {}).items():
            if _repo_relative(f"{section}.args.{k}"):
                values["args"][k] = _resolve_path(v, base_dir)
        if section == "run":
            for key in ("results_dir", "checkpoint"):
                values[key] = _resolve_path(values.get(key, fields[key].default), base_dir)
        sections[section] = cls(**values)
    config = ExperimentConfig(**sections)
    _check_values(config)
    return config


# (section, old key, new key): keys renamed since runs were first stored; still read.
RENAMED_KEYS = (("data", "task", "problem"),)
_renames_noted: set[tuple[str, str]] = set()


def _rename_keys(tree: dict[str, Any]) -> None:
    """Put renamed keys of `tree` under their new names; a one-line note on stderr, once."""
    for section, old, new in RENAMED_KEYS:
        values = tree.get(section)
        if not isinstance(values, dict) or old not in values:
            continue
        if new in values:
            raise ConfigError(
                f"Config keys [{section}] {old} and [{section}] {new} are the same key (its "
                f"old and new name); keep only {new}."
            )
        values[new] = values.pop(old)
        if (section, old) not in _renames_noted:
            _renames_noted.add((section, old))
            print(f"note: [{section}] {old} is now called [{section}] {new}.", file=sys.stderr)


def check_choice(section: str, key: str, value: Any, allowed: Any) -> None:
    """ConfigError unless `value` of `[section] key` is one of `allowed` (names, or a table's
    keys: src/train/build.py checks the optimizer and the scheduler against its tables)."""
    if value not in allowed:
        raise ConfigError(
            f"Config key [{section}] {key} = {value!r} is not one of {', '.join(allowed)}."
        )


def _number(below: float, allowed: str) -> tuple[Callable[[Any], bool], str]:
    """A finite number from 0 up to, not including, `below`."""
    return (lambda v: 0 <= v < below), (
        f"= {{!r}} must be a finite number, {allowed}; fix it in the TOML or on the command line."
    )


# The names a key takes ([optimizer] name and scheduler: src/train/build.py's tables).
CHOICES = {
    "run.task": ("train_eval", "predict_on_valid", "predict_on_test"),
    "run.server_unreachable": ("continue", "stop"),
    "data.problem": ("multilabel", "multiclass"),
    "train.amp": AMP_MODES,
    "explain.cam": ("hirescam", "gradcam"),  # src/serve/explain.py
}
CLASS = "= {!r} must be an import path of the form 'package.module:ClassName'."
SECONDS = (lambda v: 0 < v < math.inf, "must be a number of seconds above 0, got {}.")
AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1, got {}.")
# What a value must be, so that a run never starts on one that cannot work: dotted key ->
# (test, the end of the error line, where {} is the value, {length} its length as text). A NaN,
# infinite or negative learning rate, momentum, weight decay or decay factor would train to NaN
# (or away from the minimum) silently, epochs later; a momentum of 1 or more never forgets a
# gradient and diverges. A registered model's URI (models:/<name>/<version>) splits on '/' and
# ':'. MLflow's database keeps 256 characters of a model's name and 250 of a run's; NumPy takes
# seeds below 2**32; a folder name (results_dir's, the experiment's: results/<experiment>/,
# mlruns/<experiment>/) holds 255 bytes.
RULES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "run.seed": (lambda v: 0 <= v < 2**32, "= {} must be from 0 to 2**32 - 1 (4294967295)."),
    "run.experiment_name": (
        lambda v: v.strip() and len(v) <= 255,
        "must have 1 to 255 characters, not only spaces (it names a folder); it has {length}.",
    ),
    "run.run_name": (lambda v: len(v) <= 250, "must have at most 250 characters; it has {length}."),
    "run.results_dir": (
        lambda v: all(len(os.fsencode(part)) <= 255 for part in Path(v).parts),
        "= {!r} has a folder name longer than 255 bytes, which file systems refuse.",
    ),
    "run.device": (
        re.compile(r"auto|cpu|mps|cuda(:\d+)?").fullmatch,
        "= {!r} is not one of auto, cpu, cuda, cuda:N (N = a GPU index), mps.",
    ),
    "run.server_wait_s": SECONDS,
    "run.progress_every_s": SECONDS,
    "run.register_model": (
        lambda v: not v or (v.strip() and not re.search("[/:%]", v) and len(v) <= 256),
        "= {!r} is not a usable model name; use up to 256 letters, digits, '-', '_', '.' or "
        "spaces (no '/', ':' or '%').",
    ),
    "run.model_alias": (
        lambda v: (
            not v or (re.fullmatch(r"[\w-]{1,255}", v) and not re.fullmatch(r"(?i)latest|v\d+", v))
        ),
        "= {!r} is not a usable alias; use up to 255 letters, digits, '_' or '-', and not "
        "'latest' or v<number> (MLflow keeps those for its own).",
    ),
    "data.dataset": (IMPORT_PATH.fullmatch, CLASS),
    "data.batch_size": AT_LEAST_1,
    "data.num_workers": (lambda v: v == "auto" or v >= 0, 'must be 0 or more, or "auto".'),
    "model.model": (IMPORT_PATH.fullmatch, CLASS),
    "optimizer.lr": _number(math.inf, "0 or more"),
    "optimizer.momentum": _number(1, "at least 0 and below 1"),
    "optimizer.weight_decay": _number(math.inf, "0 or more"),
    "optimizer.gamma": _number(math.inf, "0 or more"),
    "optimizer.step_size": AT_LEAST_1,
    "train.epochs": AT_LEAST_1,
    "train.patience": (lambda v: v >= 0, "must be 0 or more."),
    "train.max_batches": (lambda v: v >= 0, "must be 0 (all batches) or more."),
    "explain.gallery_images": (
        lambda v: v >= 1,
        "must be at least 1; to leave the gallery out, set [explain] gallery = false.",
    ),
}


def _check_values(config: ExperimentConfig) -> None:
    flat = config.flat()
    for key, names in CHOICES.items():
        check_choice(*key.split("."), flat[key], names)
    for key, (fits, must) in RULES.items():
        if not fits(flat[key]):
            section, name = key.split(".")
            shown = must.format(flat[key], length=len(str(flat[key])))
            raise ConfigError(f"Config key [{section}] {name} {shown}")
    if config.run.model_alias and not config.run.register_model:
        raise ConfigError(
            "Config key [run] model_alias needs register_model (the model the alias is of): "
            "pass --register-model NAME with --alias."
        )
    if config.run.register_model and not config.run.log_model:
        raise ConfigError(
            "Config key [run] register_model needs log_model = true (the model it registers)."
        )
    if config.run.task == "predict_on_test" and not config.run.use_test_set:
        raise ConfigError(
            "task = 'predict_on_test' needs use_test_set = true in [run]: the test split is "
            "kept out of every run unless the config asks for it."
        )


# Config keys a resumed run may change (MLflow params are immutable, so the new value of one
# of these becomes a tag `resumed.<key>`); every other key that shapes training must match.
RESUME_MAY_CHANGE = (
    # Where the run's folder and MLflow store are now (a moved clone): --resume and the run id
    # name them.
    "run.results_dir",
    "run.tracking_uri",
    "train.epochs",
    "train.patience",
    "run.server_unreachable",
    "run.server_wait_s",
    "run.progress_every_s",
    "run.keep_last_pt",
    "run.register_model",
    "run.log_model",
    "run.model_alias",
    "run.system_metrics",
    "explain.gallery",
    "explain.gallery_images",
    "explain.cam",
    "explain.target_layer",
)
# The sections whose keys shape what a run learns (not its names, seed or folders).
TRAINING_SECTIONS = ("data", "model", "optimizer", "train")


def config_mismatch(
    saved: dict[str, Any],
    config: ExperimentConfig,
    sections: tuple[str, ...] = tuple(SECTIONS),
    may_differ: tuple[str, ...] = (),
    as_params: bool = False,
) -> tuple[str, Any, Any] | None:
    """The first dotted key (sorted) of `sections` where `saved` differs from `config`, as
    (key, saved value, config value), or None when they agree.

    The one compatibility check: resume (a checkpoint's config), predict (the model section
    of the weights' config) and a resumed MLflow run (`as_params`: `saved` holds MLflow params,
    strings, and only the keys logged there are compared). A path of `saved` is compared as a
    run stores it now (an older run's may be absolute inside the repository).
    """
    now = config.flat()
    # MLflow params: only the keys logged there; else every key of either side.
    keys = set(now) & set(saved) if as_params else set(saved) | set(now)
    for key in sorted(keys):
        if key.split(".")[0] not in sections or key in may_differ:
            continue
        theirs = _map_strings(saved.get(key), _stored_path, key)
        ours = str(now.get(key)) if as_params else now.get(key)
        if theirs != ours:
            return key, theirs, now.get(key)
    return None


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass a TOML file from experiments/.")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {path} is not valid TOML: {e}.") from None


def toml_value(text: str) -> Any:
    """A value as TOML reads it (`2` -> 2, `true` -> True); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


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


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML experiment, apply dotted-key overrides, validate and resolve it."""
    return from_dict(read_toml(path), overrides)


def to_toml(config: ExperimentConfig) -> str:
    """The resolved config as TOML text (stored with every run); `load` reads it back."""
    try:
        return tomli_w.dumps(config.to_dict())
    except TypeError as e:  # e.g. None, which TOML has no way to write
        raise ConfigError(f"The config cannot be written as TOML: {e}.") from None
