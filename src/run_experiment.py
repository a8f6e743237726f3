"""The experiment's public entry, under the tutorial's name: `run(config)` and its command line.

    python -m src.run_experiment experiments/demo2_tinyconv_tinydata.toml --epochs 5
    torchrun --nproc_per_node=4 -m src.run_experiment experiments/demo3_vgg16_pascal.toml

`run` trains and evaluates (or predicts) one experiment and tracks it in MLflow; it reads top to
bottom in src/train/experiment.py: `set_up` -> `fit` (the epoch loop) -> `finish`. The command line
(flags, one-line errors, the closing report) is src/cli.py, shared with the Demo scripts.
"""

from __future__ import annotations

import sys

from src.cli import main as cli_main
from src.train.experiment import RunResult, finish, fit, run

__all__ = ["RunResult", "finish", "fit", "main", "run"]


def main(argv: list[str] | None = None) -> int:
    """`python -m src.run_experiment CONFIG [flags]`; the exit code."""
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
