"""Groups of runs: Optuna sweeps (`python -m src.sweep`), Demo-4's grid and `--seeds`."""
