"""Reproduce a tracked run and prove it: the same config as a new run, every metric compared.

    python -m src.tools.reproduce RUN_ID                 # exit 0 only if every metric is identical
    python -m src.tools.reproduce RUN_ID --tolerance 1e-6    # accept differences up to 1e-6
    python -m src.tools.reproduce RUN_ID --set optimizer.lr=0.01   # what one change does
    python -m src.tools.reproduce RUN_ID --trust         # classes from outside the repository too

The config is the run's stored `config/config.toml` (the fully resolved config, so defaults
that change later do not change the reproduction). The new run lands in the same experiment,
named `<run name>-reproduce` and tagged `reproduces = RUN_ID`. Warnings (stderr) say when the
code (commit or uncommitted diff), the package versions, the device or a data split's
fingerprint differ from the original's, because each of these can explain a difference.
Wall-clock metrics (images/s, data-wait share) are not compared.

A stored config is code: it names the classes (dataset, model, transforms) that are imported
and called, and anyone who can write to the tracking server can edit it. The import paths are
printed first, and a class from outside this repository's own packages and torchvision is
refused unless `--trust` is given.

Exit codes: 0 identical (or within --tolerance), 1 different, 2 a user error.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import src.config as cfg
import src.tracking as tracking
from src.cli import set_overrides
from src.errors import ConfigError, TrackingError, UserError, print_user_error
from src.tools.compare_runs import MetricDiff, compare_metrics
from src.train.experiment import data_fingerprint, package_versions

# Packages outside this repository whose classes a stored run's config may name without
# `--trust`; the repository's own top-level packages are the others.
TRUSTED_PACKAGES = ("torchvision",)


@dataclass
class ComparisonResult:
    """The per-epoch comparison of every metric of two runs."""

    original_run_id: str
    new_run_id: str
    diffs: list[MetricDiff]
    tolerance: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        """The largest |difference| over all metrics and epochs (inf if a value is missing)."""
        return max((d.abs_diff for d in self.diffs), default=0.0)

    @property
    def worst(self) -> MetricDiff | None:
        return max(self.diffs, key=lambda d: d.abs_diff, default=None)

    @property
    def missing(self) -> list[MetricDiff]:
        return [d for d in self.diffs if d.original is None or d.new is None]

    @property
    def identical(self) -> bool:
        """Every metric at every epoch bit-for-bit equal (and at least one was compared)."""
        return bool(self.diffs) and self.max_abs_diff == 0.0

    @property
    def ok(self) -> bool:
        """Identical, or every difference within the tolerance."""
        return bool(self.diffs) and self.max_abs_diff <= self.tolerance

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


# ------------------------------------------------------------------ reading the original


def download_text(uri: str, run_id: str, path: str) -> str | None:
    """The text of the run's artifact `path`, or None when the run has none there."""
    store = tracking.Store(uri)
    folder, _, name = path.rpartition("/")
    if name not in {Path(a.path).name for a in store.list_artifacts(run_id, folder or None)}:
        return None
    with tracking.quiet(), tempfile.TemporaryDirectory() as tmp:
        return Path(store.download_artifacts(run_id, path, tmp)).read_text()


def load_run_config(
    uri: str, run_id: str, overrides: dict[str, Any] | None = None
) -> cfg.ExperimentConfig:
    """The run's stored resolved config (`config/config.toml`), with dotted-key overrides."""
    text = download_text(uri, run_id, "config/config.toml")
    if text is None:
        children = tracking.child_runs(uri, run_id, limit=5)
        hint = (
            f"; it is a parent run: reproduce one of its child runs, e.g. {children[0].info.run_id}"
            if children
            else "; only runs made by src.run_experiment can be reproduced"
        )
        raise TrackingError(f"MLflow run {run_id} has no config/config.toml artifact{hint}.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text)
        return cfg.load(path, overrides)


def import_paths(config: cfg.ExperimentConfig) -> list[tuple[str, str]]:
    """Every class the config names, as (key, import path): the dataset, the model and each
    transform table (`{class = "module:Name", ...}`) in [data.args], in that order. Nothing is
    imported."""
    out = [("[data] dataset", config.data.dataset), ("[model] model", config.model.model)]

    def transforms(value: Any, key: str) -> None:
        if isinstance(value, dict):
            if "class" in value:
                out.append((f"{key}.class", str(value["class"])))
            for k, v in value.items():
                if k != "class":
                    transforms(v, f"{key}.{k}")
        elif isinstance(value, list):
            for i, v in enumerate(value):
                transforms(v, f"{key}[{i}]")

    for key, value in config.data.args.items():
        transforms(value, f"data.args.{key}")
    return out


def is_trusted_import(path: str) -> bool:
    """Whether `path` ('package.module:Name') names a class of one of this repository's
    top-level packages (a folder or module right in the repository root, found where Python
    would import it from) or of a TRUSTED_PACKAGES one. The package is found, not imported:
    importing a module runs its code."""
    if not cfg.IMPORT_PATH.fullmatch(path):
        return False
    top = path.partition(":")[0].split(".")[0]
    if top in TRUSTED_PACKAGES:
        return True
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations:  # a package (a namespace package: all its folders)
        places = list(spec.submodule_search_locations)
    elif spec.has_location and spec.origin:  # a module file
        places = [spec.origin]
    else:  # built into the interpreter
        return False
    return all(Path(p).resolve().parent == cfg.REPO_ROOT for p in places)


def check_import_paths(config: cfg.ExperimentConfig, run_id: str, trust: bool = False) -> None:
    """Print the classes the run's config imports; ConfigError for one from outside this
    repository's packages and torchvision unless `trust`. Nothing is imported here."""
    paths = [(key, path, is_trusted_import(path)) for key, path in import_paths(config)]
    print(f"Classes the config of run {run_id} imports:", flush=True)
    for key, path, trusted in paths:
        note = "" if trusted else "  (outside this repository and torchvision)"
        print(f"  {key} = {path}{note}", flush=True)
    foreign = [(key, path) for key, path, trusted in paths if not trusted]
    if foreign and not trust:
        key, path = foreign[0]
        raise ConfigError(
            f"The stored config of run {run_id} imports {path!r} ({key}), from outside this "
            "repository's packages and torchvision; whoever can write to the MLflow store can "
            "edit that config, and an import runs code. Check the paths printed above, then "
            "rerun with --trust to use them."
        )


def resumed_overrides(tags: dict[str, str]) -> dict[str, Any]:
    """Config keys a resume changed (tags `resumed.<key>`, e.g. more epochs) -> new values."""
    items = [f"{k[len('resumed.') :]}={v}" for k, v in tags.items() if k.startswith("resumed.")]
    # The shared `--set` parsing turns KEY=VALUE items into typed dotted-key overrides.
    return set_overrides(items)


# ------------------------------------------------------------------ what may differ, and why


def code_warnings(uri: str, original: Any) -> list[str]:
    """Differences between the code and packages of the original run and of this checkout."""
    tags = original.data.tags
    out: list[str] = []
    now = tracking.git_state()
    then_commit = tags.get("git.commit", "unknown")
    if "unknown" in (then_commit, now["commit"]):
        out.append(
            f"cannot compare the code: the original commit is {then_commit!r}, "
            f"this checkout's is {now['commit']!r}."
        )
    elif then_commit != now["commit"]:
        out.append(
            f"the original run was made at commit {then_commit[:12]}, this checkout is at "
            f"{now['commit'][:12]} (see `git diff {then_commit[:12]} {now['commit'][:12]}`)."
        )
    else:
        then_diff = ""
        if tags.get("git.dirty") == "true":
            then_diff = download_text(uri, original.info.run_id, "environment/git_diff.patch")
        if (then_diff or "") != now["diff"]:
            out.append(
                "the uncommitted changes differ from the original run's (its diff is the "
                "artifact environment/git_diff.patch; this checkout's is `git diff HEAD`)."
            )
    now_versions = package_versions()
    changed = [
        f"{name} {tags[f'version.{name}']} -> {version}"
        for name, version in now_versions.items()
        if f"version.{name}" in tags and tags[f"version.{name}"] != version
    ]
    if changed:
        out.append(f"package versions differ from the original run's: {', '.join(changed)}.")
    if original.info.status != "FINISHED":
        out.append(
            f"the original run's status is {original.info.status}: it may have logged fewer "
            "epochs than the reproduction runs."
        )
    return out


def current_data_tags(config: cfg.ExperimentConfig) -> dict[str, str]:
    """`data.<split>.fingerprint` and `.count` of the data as they are on disk now."""
    from src.train.build import build_dataset

    tags: dict[str, str] = {}
    for split in ("train", "val", "test") if config.run.use_test_set else ("train", "val"):
        ds = build_dataset(config, split)
        if hasattr(ds, "image_ids") and hasattr(ds, "labels"):
            fp = data_fingerprint(ds)
            tags[f"data.{split}.fingerprint"] = fp["fingerprint"]
            tags[f"data.{split}.count"] = str(fp["count"])
    return tags


def data_warnings(original_tags: dict[str, str], new_tags: dict[str, str]) -> list[str]:
    """Splits whose data fingerprint differs between the original run and now."""
    out: list[str] = []
    for key in sorted(original_tags):
        if not (key.startswith("data.") and key.endswith(".fingerprint")):
            continue
        split = key[len("data.") : -len(".fingerprint")]
        if new_tags.get(key) != original_tags[key]:
            out.append(
                f"the {split} data differ from the original run's: fingerprint "
                f"{original_tags[key]} then, {new_tags.get(key, 'none')} now "
                f"(images {original_tags.get(f'data.{split}.count', '?')} then, "
                f"{new_tags.get(f'data.{split}.count', '?')} now); an image, its order or a "
                "label changed."
            )
    return out


def device_warnings(original_tags: dict[str, str], new_tags: dict[str, str]) -> list[str]:
    """A note when the original run and the reproduction ran on different devices."""
    out: list[str] = []
    if original_tags.get("device") and original_tags.get("device") != new_tags.get("device"):
        out.append(
            f"the original run ran on {original_tags['device']}, the reproduction on "
            f"{new_tags.get('device', '?')}; different kernels round differently."
        )
    return out


# ------------------------------------------------------------------ printing


def _fmt(value: float | None) -> str:
    if value is None:
        return "missing"
    return f"{value:.6g}" if value != 0 else "0"


def _at(d: MetricDiff) -> str:
    return f"epoch {d.step}"


def format_comparison(result: ComparisonResult, every_row: bool = False) -> str:
    """The comparison as text: per epoch, per metric, and the verdict.

    Epochs count from 1, as in the training output and as MLflow's steps do.
    """
    lines = [f"\nOriginal run {result.original_run_id} vs reproduction {result.new_run_id}"]
    if not result.diffs:
        lines.append("Neither run logged a metric: nothing to compare.")
        return "\n".join(lines)
    by_step: dict[int, list[MetricDiff]] = {}
    by_key: dict[str, list[MetricDiff]] = {}
    for d in result.diffs:
        by_step.setdefault(d.step, []).append(d)
        by_key.setdefault(d.key, []).append(d)
    lines += _per_epoch_lines(by_step)
    width = max(len(k) for k in by_key)
    lines.append("\nPer metric (the largest |difference| over its epochs):")
    lines.append(f"{'metric':<{width}}  {'epochs':>6}  {'max |diff|':>10}  at")
    for key, ds in by_key.items():
        worst = max(ds, key=lambda d: d.abs_diff)
        at = _at(worst) if worst.abs_diff > 0 else "-"
        lines.append(f"{key:<{width}}  {len(ds):>6}  {_fmt(worst.abs_diff):>10}  {at}")
    if every_row:
        lines.append("\nEvery metric at every epoch:")
        lines.append(f"{'metric':<{width}}  {'epoch':>5}  {'original':>12}  {'reproduced':>12}")
        for d in result.diffs:
            lines.append(
                f"{d.key:<{width}}  {d.step:>5}  {_fmt(d.original):>12}  {_fmt(d.new):>12}"
            )
    return "\n".join(lines + _verdict_lines(result, len(by_key), len(by_step)))


def _per_epoch_lines(by_step: dict[int, list[MetricDiff]]) -> list[str]:
    """The table of epochs: val_loss of both runs and the largest difference of the epoch."""
    lines = [
        "\nPer epoch (the largest |difference| over its metrics):",
        f"{'epoch':>5}  {'val_loss original':>17}  {'val_loss reproduced':>19}  "
        f"{'metrics':>7}  {'max |diff|':>10}  worst metric",
    ]
    for step, ds in sorted(by_step.items()):
        val = next((d for d in ds if d.key == "val_loss"), None)
        worst = max(ds, key=lambda d: d.abs_diff)
        lines.append(
            f"{step:>5}  {_fmt(val.original if val else None):>17}  "
            f"{_fmt(val.new if val else None):>19}  {len(ds):>7}  {_fmt(worst.abs_diff):>10}  "
            f"{worst.key if worst.abs_diff > 0 else '-'}"
        )
    return lines


def _verdict_lines(result: ComparisonResult, n_metrics: int, n_epochs: int) -> list[str]:
    """The largest difference, the values only one run logged, and the verdict."""
    worst = result.worst
    lines = [
        f"\nLargest absolute difference: {_fmt(result.max_abs_diff)}"
        + (f" ({worst.key} at {_at(worst)})" if worst and worst.abs_diff > 0 else "")
        + f", over {n_metrics} metrics and {n_epochs} epochs."
    ]
    if result.missing:
        d = result.missing[0]
        side = "the reproduction" if d.new is None else "the original"
        lines.append(
            f"{len(result.missing)} values were logged by one run only "
            f"(first: {d.key} at {_at(d)}, missing in {side})."
        )
    if result.identical:
        lines.append("IDENTICAL: the run is reproduced bit for bit.")
    elif result.ok:
        lines.append(f"REPRODUCED within the tolerance {result.tolerance:g}.")
    else:
        lines.append(
            f"DIFFERENT: the largest difference {_fmt(result.max_abs_diff)} exceeds the "
            f"tolerance {result.tolerance:g}."
        )
    return lines


# ------------------------------------------------------------------ reproducing


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def warnings_before(uri: str, original: Any, config: Any, resumed: dict, overrides: dict) -> list:
    """What may make the reproduction differ, known before it runs: a resumed original, the
    overrides, code and data that changed since."""
    warnings: list[str] = []
    if resumed:
        changed = ", ".join(f"{k} = {v!r}" for k, v in resumed.items())
        warnings.append(
            f"the original run was resumed with {changed}; the reproduction runs straight "
            "through with the new value(s)."
        )
    if overrides:
        changed = ", ".join(f"{k} = {v!r}" for k, v in overrides.items())
        warnings.append(f"the reproduction changes the original config: {changed}.")
    warnings += code_warnings(uri, original)
    return warnings + data_warnings(original.data.tags, current_data_tags(config))


def reproduce(
    run_id: str,
    tolerance: float = 0.0,
    tracking_uri: str | None = None,
    overrides: dict[str, Any] | None = None,
    trust: bool = False,
) -> ComparisonResult:
    """Run the config of MLflow run `run_id` again as a new run and compare every metric.

    `tolerance` is the largest absolute difference per metric value that still counts as
    reproduced. `overrides` (dotted config keys) deliberately change the reproduction, e.g.
    `{'optimizer.lr': 0.01}`; they are reported as a warning. Warnings are printed to stderr
    as they are found and returned in the result. `trust` lets the config name classes from
    outside this repository and torchvision (see `check_import_paths`).
    """
    from src.run_experiment import run

    if tolerance < 0 or math.isnan(tolerance):
        raise ConfigError(f"--tolerance must be 0 or more, got {tolerance}.")
    uri = tracking.existing_store(tracking_uri)
    original = tracking.get_run(uri, run_id)
    resumed = resumed_overrides(original.data.tags)
    config = load_run_config(uri, run_id, {**resumed, **(overrides or {})})
    if "run.run_name" not in (overrides or {}):
        config = config.replace(**{"run.run_name": f"{config.run.run_name}-reproduce"})
    if tracking.tracking_uri(config.run.tracking_uri) != uri:
        config = config.replace(**{"run.tracking_uri": uri})
    check_import_paths(config, run_id, trust)
    # Before the run, which can take hours: data that changed since explain any difference.
    warnings = warnings_before(uri, original, config, resumed, overrides or {})
    for w in warnings:
        _warn(w)

    result = run(config, extra_tags={"reproduces": run_id})
    new_tags = tracking.get_run(uri, result.run_id).data.tags
    if "reproduces" not in new_tags:  # tasks that only predict may not pass extra tags on
        tracking.Store(uri).set_tag(result.run_id, "reproduces", run_id)
    later = device_warnings(original.data.tags, new_tags)
    for w in later:
        _warn(w)
    comparison = ComparisonResult(
        run_id,
        result.run_id,
        compare_metrics(uri, run_id, result.run_id),
        tolerance,
        warnings + later,
    )
    on_gpu = new_tags.get("device", "cpu") != "cpu"
    if not comparison.ok and on_gpu and new_tags.get("deterministic") != "True":
        comparison.warnings.append(
            f"the runs were not deterministic on {new_tags['device']}: GPU kernels may differ "
            "from run to run; rerun the original with --deterministic, or pass --tolerance."
        )
        _warn(comparison.warnings[-1])
    return comparison


# ------------------------------------------------------------------ command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.reproduce",
        description="Run a tracked MLflow run again as a new run and compare every metric.",
    )
    parser.add_argument("run_id", help="the MLflow run id of the original run")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="largest absolute difference per metric value that counts as reproduced "
        "(default 0: bit for bit)",
    )
    parser.add_argument(
        "--tracking-uri", help="the MLflow store of the original run (default: as for training)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a config key in the reproduction, e.g. --set optimizer.lr=0.01 "
        "(the comparison then shows the effect of the change)",
    )
    parser.add_argument(
        "--every-row", action="store_true", help="also print every metric at every epoch"
    )
    parser.add_argument(
        "--trust",
        action="store_true",
        help="import the classes the stored config names also when they come from outside "
        "this repository and torchvision (the config can be edited by anyone who can write to "
        "the MLflow store: read the printed import paths first)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Reproduce, print the comparison; 0 reproduced, 1 different, 2 a user error."""
    args = make_parser().parse_args(argv)
    try:
        overrides = set_overrides(args.set)
        result = reproduce(
            args.run_id, args.tolerance, args.tracking_uri, overrides or None, args.trust
        )
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt:
        return 130
    print(format_comparison(result, args.every_row))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
