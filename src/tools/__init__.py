"""Tools a user runs on runs, apart from training: `reproduce`, `compare_runs`, `smoke`."""
