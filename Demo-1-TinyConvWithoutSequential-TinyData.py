"""Demo-1: the tutorial's TinyConvWithoutSequential (layers called one by one) on TinyData.

    python Demo-1-TinyConvWithoutSequential-TinyData.py
    # settings: experiments/demo1_tinyconvwithoutsequential_tinydata.toml
    python Demo-1-TinyConvWithoutSequential-TinyData.py --epochs 5 --seed 1 --run-name quick

Every run is tracked in MLflow; the script ends by printing the best validation AUROC
and the command that opens the MLflow UI on it.
"""

import sys
from pathlib import Path

from src.cli import main

if __name__ == "__main__":
    config = (
        Path(__file__).resolve().parent
        / "experiments"
        / "demo1_tinyconvwithoutsequential_tinydata.toml"
    )
    sys.exit(main(default_config=str(config), description=__doc__.splitlines()[0]))
