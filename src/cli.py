"""The command line shared by `python -m src.run_experiment` and the Demo scripts: flags,
one-line errors (exit code 2) and the closing report."""

from __future__ import annotations

import argparse
import atexit
import gc
import math
from typing import TYPE_CHECKING

from src.config import ExperimentConfig
from src.errors import ConfigError, UserError, print_user_error
from src.flags import FlagParser, add_config_flags, load_from_args
from src.interrupts import exit_code

if TYPE_CHECKING:
    from src.train.experiment import RunResult

# torch, MLflow and the training code are imported once the flags and the config are read:
# `--help` and a mistyped flag or key answer at once, not after seconds of imports.


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
    # At exit, Python collects the objects of every module (torch's, ...) one last time:
    # seconds after a run. Frozen objects are left to the end of the process.
    atexit.unregister(gc.freeze)  # once, however often main runs in one process
    atexit.register(gc.freeze)
    try:
        config = load_from_args(args.config, args)
        if args.seeds:
            from src.sweep.multirun import run_seeds

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
        from src.train.experiment import run

        result = run(config, resume=args.resume)
    except UserError as e:
        return print_user_error(e)
    except KeyboardInterrupt as e:  # the run said how it stopped and how to resume
        return exit_code(e)
    if result.results_dir is not None:
        report(config, result)
    return 0


def group_hint(config: ExperimentConfig, experiment_id: str, parent_id: str) -> str:
    from src import tracking

    return tracking.ui_hint(
        tracking.tracking_uri(config.run.tracking_uri), experiment_id, parent_id
    )


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
    from src import tracking

    print(
        tracking.ui_hint(
            tracking.tracking_uri(config.run.tracking_uri), result.experiment_id, result.run_id
        )
    )
