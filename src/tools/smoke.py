"""A PASCAL smoke run without the 3.4 GB download: `make smoke` (or `python -m src.tools.smoke`).

A tiny PASCAL VOC 2012 + SBD tree in the real on-disk formats (JPEGs, palette PNG masks, SBD
`.mat` files) is written to a temporary folder; then Demo-0, Demo-3 and Demo-4 run on it as a
user runs them, at 96 px with random weights, one epoch of two batches, into an MLflow store
in that folder. Each Demo's summary line is printed; the first Demo that fails stops the smoke
run with its last lines and exit code 1. The folder is removed at the end (`--keep` keeps it,
to look at the runs: the command to open them is printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from load_dataset.generators.pascal_tree import make_pascal_tree
from src.config import REPO_ROOT

SMALL = ["--image-size", "96", "--no-pretrained", "--epochs", "1", "--batch-size", "2"]
SMALL += ["--max-batches", "2", "--num-workers", "0", "--device", "cpu"]
# The line of each Demo's output that says how it went.
SUMMARY = {
    "Demo-0-Unit-Tests-and-Visualization.py": r"\d+ passed",
    "Demo-3-VGG16-PASCAL.py": r"^Best epoch",
    "Demo-4-VGG16Customizable-PASCAL.py": r"^best_val_auroc_mean\.mean",
}


def commands(voc: Path, sbd: Path, results: Path) -> list[list[str]]:
    data = ["--voc-dir", str(voc), "--sbd-dir", str(sbd), "--results-dir", str(results)]
    return [
        [
            "Demo-0-Unit-Tests-and-Visualization.py",
            "--voc-dir",
            str(voc),
            "--results-dir",
            str(results),
            "--n-images",
            "2",
            "--tests",
            "tests/test_tutorial_unit_tests.py",
        ],
        ["Demo-3-VGG16-PASCAL.py", *data, *SMALL],
        ["Demo-4-VGG16Customizable-PASCAL.py", *data, *SMALL],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="pascal-smoke-"))
    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MPLBACKEND": "Agg"}
    try:
        tree = make_pascal_tree(folder / "data")
        print(f"Synthetic VOC 2012 + SBD tree in {folder / 'data'}", flush=True)
        start = time.monotonic()
        for cmd in commands(tree.voc_dir, tree.sbd_dir, folder / "results"):
            began = time.monotonic()
            out = subprocess.run(
                [sys.executable, str(REPO_ROOT / cmd[0]), *cmd[1:]],
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO_ROOT,
            )
            lines = (out.stdout + out.stderr).splitlines()
            if out.returncode != 0:
                print(f"{cmd[0]} failed (exit code {out.returncode}):", file=sys.stderr)
                print("\n".join(lines[-15:]), file=sys.stderr)
                return 1
            found = [line for line in lines if re.search(SUMMARY[cmd[0]], line)]
            summary = found[-1].strip() if found else "(finished)"
            print(f"{cmd[0]}: {summary}  [{time.monotonic() - began:.0f} s]", flush=True)
        print(f"Smoke run passed in {time.monotonic() - start:.0f} s.")
        if args.keep:
            print(f"Runs: .venv/bin/mlflow ui --backend-store-uri {store}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
