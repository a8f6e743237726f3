"""Wall time of Demo-4's grid at smoke size on the CPU, with --workers 1 and --workers 2.

    python -m benchmarks.sweep            # the 3 random-init cells, 1 epoch each
    python -m benchmarks.sweep --workers 1 2 4

A tiny synthetic VOC 2012 + SBD tree (load_dataset/generators/pascal_tree.py) is written to
a temporary folder; Demo-4 runs on it as a user runs it (96 px, random weights, one epoch of
two batches of two images), once per worker count, each into its own MLflow store and Optuna
storage.
Prints one line per worker count: the wall time of the whole command, imports included.
On a 2-core machine, 35.3 s with one worker and 51.9 s with two: a worker is a process that
pays its imports (one worker runs in the sweep's own process), and at this size the imports,
not the training, are the work. See README.md, "Demo-4's grid".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import cores, timed_command
from load_dataset.generators.pascal_tree import make_pascal_tree
from src.config import REPO_ROOT
from src.tools.smoke import SMALL


def time_grid(workers: int, voc: Path, sbd: Path, folder: Path) -> float:
    """Seconds for `Demo-4 ... --no-pretrained --workers N` into stores in `folder`."""
    folder.mkdir(parents=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    env["MPLBACKEND"] = "Agg"
    cmd = [sys.executable, str(REPO_ROOT / "Demo-4-VGG16Customizable-PASCAL.py")]
    cmd += ["--voc-dir", str(voc), "--sbd-dir", str(sbd), "--results-dir", str(folder / "r")]
    cmd += [*SMALL, "--workers", str(workers)]
    return timed_command(cmd, env, f"Demo-4 with --workers {workers}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="benchmark-sweep-"))
    try:
        tree = make_pascal_tree(root / "data")
        print(f"Demo-4 grid, 3 cells (random init), smoke size, CPU ({cores()} cores):", flush=True)
        for workers in args.workers:
            seconds = time_grid(workers, tree.voc_dir, tree.sbd_dir, root / f"w{workers}")
            print(f"  --workers {workers}: {seconds:.1f} s", flush=True)
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
