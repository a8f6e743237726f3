"""The search space of a sweep: a TOML file read into a `SweepSpace`, checked against the config.

    # experiments/demo2_lr_wd.sweep.toml
    metric = "val_auroc_mean"      # at the best epoch (lowest val_loss); the default
    direction = "maximize"         # default: minimize for *_loss, else maximize
    sampler = { name = "tpe" }     # tpe, random, cmaes, qmc (a grid: grid); other keys go to it
    pruner = { name = "median", n_warmup_steps = 2 }  # or percentile, hyperband, threshold, none

    [space]                        # config keys, dotted
    "optimizer.lr" = { type = "float", low = 1e-4, high = 0.3, log = true }
    "data.batch_size" = { type = "int", low = 8, high = 32, step = 8 }
    "optimizer.name" = { type = "categorical", choices = ["SGD", "Adam"] }

A key given a plain list of values (`"model.args.conv_type" = ["a", "b"]`) makes the space a
grid: every key must then be a list, and Optuna's GridSampler runs every combination once.
Everything here is checked before a trial starts; a mistake is a ConfigError naming the key.
Nothing in this module imports torch or Optuna.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from src.config import ExperimentConfig, read_toml
from src.errors import ConfigError

# The per-epoch metrics that a run also sums up at its best epoch (`best_<metric>`).
METRICS = (
    "val_auroc_mean",
    "val_ap_mean",
    "val_accuracy_mean",
    "val_accuracy",
    "val_loss",
    "train_loss",
)
SAMPLERS = ("tpe", "random", "cmaes", "qmc", "grid")
PRUNERS = ("median", "percentile", "hyperband", "successive_halving", "threshold", "none")
TOP_KEYS = ("metric", "direction", "sampler", "pruner", "space")
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class SweepSpace:
    """What a sweep varies and what it optimizes.

    `params`: config key -> distribution table (`{type, low, high, log, step}` or
    `{type = "categorical", choices}`), or a list of values for a grid.
    """

    params: dict[str, Any]
    metric: str = "val_auroc_mean"
    direction: str = "maximize"
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "tpe"})
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})

    @property
    def is_grid(self) -> bool:
        return self.sampler["name"] == "grid"

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.params.values())

    def grid_cells(self) -> list[dict[str, Any]]:
        """Every combination of a grid, the first key varying slowest."""
        keys = list(self.params)
        return [dict(zip(keys, values)) for values in itertools.product(*self.params.values())]

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "direction": self.direction,
            "sampler": dict(self.sampler),
            "pruner": dict(self.pruner),
            "space": dict(self.params),
        }


def grid_space(params: dict[str, list[Any]], metric: str = "val_auroc_mean") -> SweepSpace:
    """A grid over `params` (config key -> values), every cell trained in full (no pruning)."""
    return SweepSpace(params, metric, default_direction(metric), {"name": "grid"}, {"name": "none"})


def default_direction(metric: str) -> str:
    return "minimize" if metric.endswith("_loss") else "maximize"


def read_space(path: str | Path, config: ExperimentConfig) -> SweepSpace:
    """The space file at `path`, checked against `config` (see the module docstring)."""
    tree = read_toml(path)
    return space_from_dict(tree, config, f"Space file {path}")


def space_from_dict(tree: dict[str, Any], config: ExperimentConfig, where: str) -> SweepSpace:
    unknown = sorted(set(tree) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; a space file has {', '.join(TOP_KEYS)}."
        )
    params = tree.get("space")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where} has no [space] table naming the config keys to vary.")
    metric = tree.get("metric", "val_auroc_mean")
    if metric not in METRICS:
        raise ConfigError(
            f"{where}: metric {metric!r} is not one a run reports at its best epoch; use one "
            f"of {', '.join(METRICS)}."
        )
    direction = tree.get("direction", default_direction(metric))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}: direction {direction!r} must be maximize or minimize.")
    grid = all(isinstance(v, list) for v in params.values())
    if not grid and any(isinstance(v, list) for v in params.values()):
        raise ConfigError(
            f"{where} mixes lists (a grid) and distributions (a search); write a list as "
            '{ type = "categorical", choices = [...] } to search it.'
        )
    sampler = _named_table(tree, "sampler", "grid" if grid else "tpe", SAMPLERS, where)
    pruner = _named_table(tree, "pruner", "none" if grid else "median", PRUNERS, where)
    if (sampler["name"] == "grid") != grid:
        raise ConfigError(
            f"{where}: sampler 'grid' takes a list of values for every key, and a list of "
            "values for every key needs sampler 'grid'."
        )
    for key, spec in params.items():
        _check_param(key, spec, config, where)
    return SweepSpace(dict(params), metric, direction, sampler, pruner)


def _named_table(
    tree: dict[str, Any], key: str, default: str, names: tuple[str, ...], where: str
) -> dict[str, Any]:
    table = tree.get(key, {"name": default})
    if isinstance(table, str):
        table = {"name": table}
    if not isinstance(table, dict) or table.get("name", default) not in names:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(names)}, got {table!r}.")
    return {"name": default, **table}


def _check_param(key: str, spec: Any, config: ExperimentConfig, where: str) -> None:
    """One key of [space]: a config key with a well-formed distribution whose values the
    config accepts (the lowest and highest value, or every choice, are tried)."""
    flat = config.flat()
    if key not in flat:
        section = key.split(".")[0]
        near = sorted(k for k in flat if k.startswith(section + "."))[:6]
        raise ConfigError(
            f"{where}: {key!r} is not a key of the experiment's config"
            + (f" (its [{section}] keys include {', '.join(near)})." if near else ".")
        )
    if isinstance(spec, list):
        values = spec
        if not values or len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: the values of {key!r} must be a non-empty list, no twice.")
    else:
        values = _distribution_ends(key, spec, where)
    for value in values:
        try:
            config.replace(**{key: value})
        except ConfigError as e:
            raise ConfigError(f"{where}: {key} = {value!r} does not fit the config: {e}") from None


def _distribution_ends(key: str, spec: Any, where: str) -> list[Any]:
    """The values to try of a distribution table; ConfigError when it is malformed."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise ConfigError(
            f"{where}: {key!r} must be a list of values or a table with type = float, int or "
            f"categorical, got {spec!r}."
        )
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}}
    allowed["categorical"] = {"choices"}
    extra = sorted(set(spec) - allowed[kind] - {"type"})
    if extra:
        raise ConfigError(f"{where}: {key!r} ({kind}) does not take {extra[0]!r}.")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{where}: {key!r} needs choices = [at least two values].")
        return choices
    low, high = spec.get("low"), spec.get("high")
    number = "a whole number" if kind == "int" else "a finite number"
    if not (_is_number(low, kind) and _is_number(high, kind)):
        raise ConfigError(
            f"{where}: {key!r} needs low and high, each {number}, got low = {low!r}, "
            f"high = {high!r}."
        )
    if low >= high:
        raise ConfigError(f"{where}: {key!r} has low = {low} >= high = {high}; low must be below.")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: {key!r} has log = {log!r}; write log = true or log = false.")
    if log and low <= 0:
        raise ConfigError(
            f"{where}: {key!r} is log-scaled, so low must be above 0, got {low}; raise low "
            "or drop log = true."
        )
    if step is None:
        return [low, high]
    if not _is_number(step, kind) or step <= 0:
        raise ConfigError(
            f"{where}: {key!r} has step = {step!r}; step must be {number} above 0 "
            "(or leave step out to draw any value between low and high)."
        )
    # In decimals: 0.3 - 0.1 is 0.19999999999999998 in floats, below a step of 0.2.
    span = Decimal(repr(high)) - Decimal(repr(low))
    if Decimal(repr(step)) > span:
        raise ConfigError(
            f"{where}: {key!r} has step = {step}, larger than high - low = {span}, so only "
            "low could be drawn; give a smaller step or a wider range."
        )
    if log and (kind == "float" or step != 1):  # Optuna's log scale has no steps
        raise ConfigError(f"{where}: {key!r} cannot be both log-scaled and stepped; drop one.")
    return [low, high]


def _is_number(value: Any, kind: str) -> bool:
    """An int (kind "int"), or a finite int or float (kind "float"); never a bool."""
    number = int if kind == "int" else (int, float)
    return isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)


def suggest(trial: Any, space: SweepSpace) -> dict[str, Any]:
    """The trial's values, dotted config key -> value, drawn by its sampler."""
    out = {}
    for key, spec in space.params.items():
        if isinstance(spec, list):
            out[key] = trial.suggest_categorical(key, spec)
        elif spec["type"] == "categorical":
            out[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            step = spec.get("step", 1)
            out[key] = trial.suggest_int(
                key, spec["low"], spec["high"], step=step, log=spec.get("log", False)
            )
        else:
            out[key] = trial.suggest_float(
                key, spec["low"], spec["high"], step=spec.get("step"), log=spec.get("log", False)
            )
    return out


def make_sampler(space: SweepSpace, seed: int, offset: int = 0) -> Any:
    """The Optuna sampler the space names; its other keys are the sampler's arguments. Its
    seed: the space's `seed`, else `seed`, plus `offset`, modulo 2**32 (numpy's seed range)."""
    import optuna

    name, args = space.sampler["name"], {k: v for k, v in space.sampler.items() if k != "name"}
    args["seed"] = (args.get("seed", seed) + offset) % 2**32
    if name == "grid":
        return optuna.samplers.GridSampler(space.params, **args)
    cls = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "qmc": optuna.samplers.QMCSampler,
    }[name]
    return _construct(cls, args, "sampler")


def make_pruner(space: SweepSpace) -> Any:
    import optuna

    name, args = space.pruner["name"], {k: v for k, v in space.pruner.items() if k != "name"}
    cls = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "threshold": optuna.pruners.ThresholdPruner,
        "none": optuna.pruners.NopPruner,
    }[name]
    return _construct(cls, args, "pruner")


def _construct(cls: type, args: dict[str, Any], what: str) -> Any:
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"The {what} {cls.__name__} does not take {args}: {e}.") from None
