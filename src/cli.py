"""The command line shared by `python -m src.run_experiment` and the Demo scripts: flags
(src/flags.py), one-line errors (exit code 2) and the closing report."""

from __future__ import annotations

import argparse
import collections
import math

import src.tracking as tracking
from src.config import ExperimentConfig
from src.errors import ConfigError, UserError, print_user_error
from src.flags import FlagParser, add_config_flags, load_from_args
from src.interrupts import exit_code
from src.sweep.multirun import run_seeds
from src.train.experiment import RunResult, run


def make_parser(default_config: str | None, description: str) -> argparse.ArgumentParser:
    """The shared flags; when it parses, the parser adds the folder flags of the dataset of the
    experiment file it is given (`config`), see `src.flags.FlagParser`."""
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


def group_hint(config: ExperimentConfig, experiment_id: str, parent_id: str) -> str:
    return tracking.ui_hint(
        tracking.tracking_uri(config.run.tracking_uri), experiment_id, parent_id
    )


def report(config: ExperimentConfig, result: RunResult) -> None:
    """The closing lines: the best epoch's figures (or the predictions'), where the files are,
    and the link to the run in the MLflow UI."""
    m = collections.defaultdict(lambda: math.nan, result.best_metrics)
    if config.run.task == "train_eval":
        print(
            f"\nBest epoch (lowest val_loss): {result.best_epoch} of {result.epochs_run}"
            + (" (stopped early)" if result.stopped_early else "")
            + f": val_loss {m['best_val_loss']:.4f}, val_auroc_mean "
            f"{m['best_val_auroc_mean']:.4f}, val_ap_mean {m['best_val_ap_mean']:.4f}"
        )
        print(f"Checkpoints: {result.results_dir}")
    else:
        split = "val" if config.run.task == "predict_on_valid" else "test"
        print(
            f"\n{split} predictions of the weights of epoch {result.best_epoch} "
            f"({config.run.checkpoint}): {split}_auroc_mean {m[f'{split}_auroc_mean']:.4f}, "
            f"{split}_ap_mean {m[f'{split}_ap_mean']:.4f}"
        )
        print(f"Predictions and per-class tables: {result.results_dir / 'tables'}")
    uri = tracking.tracking_uri(config.run.tracking_uri)
    print(tracking.ui_hint(uri, result.experiment_id, result.run_id))
