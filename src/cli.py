"""The command line shared by `python -m src.run_experiment` and the Demo scripts: flags,
one-line errors (exit code 2) and the closing report."""

from __future__ import annotations

import argparse
import math
import sys

from src import checkpoint as ckpt_io
from src import tracking
from src.config import ConfigError, ExperimentConfig
from src.flags import add_config_flags, load_from_args
from src.loop import NonFiniteLossError
from src.run_experiment import RunResult, run

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ckpt_io.CheckpointError,
    tracking.TrackingError,
)


def one_line(e: BaseException) -> str:
    """The user-facing sentence of an error, also when re-raised from a loader worker."""
    text = str(e)
    if "Original Traceback" in text:  # DataLoader worker: the original message is last
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def user_errors() -> tuple[type[BaseException], ...]:
    from load_dataset.errors import DataError
    from models.custom_models_base import PretrainedWeightsError

    return (*USER_ERRORS, DataError, NonFiniteLossError, PretrainedWeightsError)


def make_parser(default_config: str | None, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
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
            from src.multirun import run_seeds

            if args.resume:
                raise ConfigError("--seeds and --resume cannot be combined; resume one child run.")
            run_seeds(config, args.seeds)
            return 0
        result = run(config, resume=args.resume)
    except user_errors() as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if result.results_dir is not None:
        report(config, result)
    return 0


def report(config: ExperimentConfig, result: RunResult) -> None:
    m = result.best_metrics
    if config.run.task == "train_eval":
        auroc, ap = m.get("best_val_auroc_mean", math.nan), m.get("best_val_ap_mean", math.nan)
        loss = m.get("best_val_loss", math.nan)
        print(
            f"\nBest epoch (lowest val_loss): {result.best_epoch} of {result.epochs_run}"
            + (" (stopped early)" if result.stopped_early else "")
            + f": val_loss {loss:.4f}, val_auroc_mean {auroc:.4f}, val_ap_mean {ap:.4f}"
        )
        print(f"Checkpoints: {result.results_dir}")
    else:
        split = "val" if config.run.task == "predict_on_valid" else "test"
        auroc, ap = m.get(f"{split}_auroc_mean", math.nan), m.get(f"{split}_ap_mean", math.nan)
        print(
            f"\n{split} predictions of the weights of epoch {result.best_epoch} "
            f"({config.run.checkpoint}): {split}_auroc_mean {auroc:.4f}, {split}_ap_mean {ap:.4f}"
        )
        print(f"Predictions and per-class tables: {result.results_dir / 'tables'}")
    print(tracking.ui_hint(tracking.tracking_uri(config), result.experiment_id))
